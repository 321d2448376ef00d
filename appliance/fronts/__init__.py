"""Protocol fronts: the asyncio layer that wires sans-IO codecs to sockets."""

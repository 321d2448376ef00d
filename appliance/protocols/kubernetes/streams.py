"""Upgraded Kubernetes streams read on the side: SPDY/3.1 frames and WebSocket channel messages.

``kubectl exec/attach/port-forward`` (1.20) upgrade an HTTP/1.1 request to SPDY/3.1 and open
one SPDY stream per channel (a ``SYN_STREAM`` whose ``streamtype`` header says stdin, stdout,
stderr, error, resize; for port-forward data/error with a ``port``). Other clients (the
``kubernetes`` Python client, newer kubectl) use WebSocket ``*.channel.k8s.io``: each message's
first byte names the channel (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize).

The front relays the bytes unchanged; these readers only observe a copy, one per direction,
sans-IO (bytes in, :class:`ChannelData` out) so a recording can say what the command printed.
A malformed stream raises :class:`StreamProtocolError`; the relay then ends the connection.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed
from wsproto.utilities import ProtocolError as WsProtocolError

from appliance.errors import BotwardenError

# The SPDY/3 header compression dictionary (SPDY Protocol Draft 3, section 2.6.10.1).
SPDY3_DICTIONARY = bytes.fromhex(
    "000000076f7074696f6e73000000046865616400000004706f7374000000037075740000000664656c65746500000005"
    "7472616365000000066163636570740000000e6163636570742d636861727365740000000f6163636570742d656e636f"
    "64696e670000000f6163636570742d6c616e67756167650000000d6163636570742d72616e6765730000000361676500"
    "000005616c6c6f770000000d617574686f72697a6174696f6e0000000d63616368652d636f6e74726f6c0000000a636f"
    "6e6e656374696f6e0000000c636f6e74656e742d6261736500000010636f6e74656e742d656e636f64696e6700000010"
    "636f6e74656e742d6c616e67756167650000000e636f6e74656e742d6c656e67746800000010636f6e74656e742d6c6f"
    "636174696f6e0000000b636f6e74656e742d6d64350000000d636f6e74656e742d72616e67650000000c636f6e74656e"
    "742d74797065000000046461746500000004657461670000000665787065637400000007657870697265730000000466"
    "726f6d00000004686f73740000000869662d6d617463680000001169662d6d6f6469666965642d73696e63650000000d"
    "69662d6e6f6e652d6d617463680000000869662d72616e67650000001369662d756e6d6f6469666965642d73696e6365"
    "0000000d6c6173742d6d6f646966696564000000086c6f636174696f6e0000000c6d61782d666f727761726473000000"
    "06707261676d610000001270726f78792d61757468656e7469636174650000001370726f78792d617574686f72697a61"
    "74696f6e0000000572616e676500000007726566657265720000000b72657472792d6166746572000000067365727665"
    "7200000002746500000007747261696c6572000000117472616e736665722d656e636f64696e67000000077570677261"
    "64650000000a757365722d6167656e74000000047661727900000003766961000000077761726e696e67000000107777"
    "772d61757468656e746963617465000000066d6574686f64000000036765740000000673746174757300000006323030"
    "204f4b0000000776657273696f6e00000008485454502f312e310000000375726c000000067075626c69630000000a73"
    "65742d636f6f6b69650000000a6b6565702d616c697665000000066f726967696e313030313031323031323032323035"
    "323036333030333032333033333034333035333036333037343032343035343036343037343038343039343130343131"
    "343132343133343134343135343136343137353032353034353035323033204e6f6e2d417574686f7269746174697665"
    "20496e666f726d6174696f6e323034204e6f20436f6e74656e74333031204d6f766564205065726d616e656e746c7934"
    "303020426164205265717565737434303120556e617574686f72697a656434303320466f7262696464656e343034204e"
    "6f7420466f756e6435303020496e7465726e616c20536572766572204572726f72353031204e6f7420496d706c656d65"
    "6e746564353033205365727669636520556e617661696c61626c654a616e20466562204d617220417072204d6179204a"
    "756e204a756c204175672053657074204f6374204e6f76204465632030303a30303a3030204d6f6e2c205475652c2057"
    "65642c205468752c204672692c205361742c2053756e2c20474d546368756e6b65642c746578742f68746d6c2c696d61"
    "67652f706e672c696d6167652f6a70672c696d6167652f6769662c6170706c69636174696f6e2f786d6c2c6170706c69"
    "636174696f6e2f7868746d6c2b786d6c2c746578742f706c61696e2c746578742f6a6176617363726970742c7075626c"
    "6963707269766174656d61782d6167653d677a69702c6465666c6174652c73646368636861727365743d7574662d3863"
    "6861727365743d69736f2d383835392d312c7574662d2c2a2c656e713d302e"
)

MAX_FRAME = 1 << 24          # SPDY's 24-bit length: the most a reader buffers
MAX_HEADER_BLOCK = 1 << 20   # decompressed headers of one frame
CHANNELS = {0: "stdin", 1: "stdout", 2: "stderr", 3: "error", 4: "resize"}

_SYN_STREAM, _SYN_REPLY, _RST_STREAM, _HEADERS = 1, 2, 3, 8


class StreamProtocolError(BotwardenError):
    """The upgraded stream is not the SPDY/3.1 or WebSocket the handshake announced."""


@dataclass(frozen=True)
class ChannelData:
    """Bytes of one channel (``stdout``, ``stderr``, ``error``, ``stdin``, ``resize``, ``data``
    for port-forward, or ``""`` when unknown)."""

    channel: str
    data: bytes


class SpdyReader:
    """One direction of a SPDY/3.1 connection. Stream types come from the SYN_STREAMs (the
    client opens every stream in Kubernetes' use), so both directions share one :class:`SpdyStreams`."""

    def __init__(self, streams: "SpdyStreams"):
        self.streams = streams
        self._buf = bytearray()
        self._inflate = zlib.decompressobj(zdict=SPDY3_DICTIONARY)

    def feed(self, data: bytes) -> list[ChannelData]:
        self._buf += data
        out: list[ChannelData] = []
        buf = self._buf
        while len(buf) >= 8:
            first, flags_len = struct.unpack_from(">II", buf)
            length = flags_len & 0xFFFFFF
            if len(buf) < 8 + length:
                break
            payload = bytes(buf[8:8 + length])
            del buf[:8 + length]
            if first & 0x80000000:
                version, ftype = (first >> 16) & 0x7FFF, first & 0xFFFF
                if version != 3:
                    raise StreamProtocolError(f"SPDY control frame of version {version} (expected 3)")
                self._control(ftype, payload)
            else:
                sid = first & 0x7FFFFFFF
                if payload:
                    out.append(ChannelData(self.streams.types.get(sid, ""), payload))
        return out

    @property
    def at_boundary(self) -> bool:
        """Everything fed so far was whole frames (a frame may be written after it)."""
        return not self._buf

    def error_frame(self, status: bytes) -> bytes | None:
        """A data frame carrying ``status`` on the error stream, closing it (FLAG_FIN), or None
        when no error stream was opened."""
        sid = next((sid for sid, kind in self.streams.types.items() if kind == "error"), None)
        if sid is None or len(status) > MAX_FRAME - 1:
            return None
        return struct.pack(">II", sid, 0x01000000 | len(status)) + status

    def _control(self, ftype: int, payload: bytes) -> None:
        if ftype == _SYN_STREAM:
            if len(payload) < 10:
                raise StreamProtocolError("SPDY SYN_STREAM frame too short")
            sid = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            headers = self._headers(payload[10:])
            self.streams.types[sid] = headers.get("streamtype", "")
            if "port" in headers:
                self.streams.ports[sid] = headers["port"]
        elif ftype in (_SYN_REPLY, _HEADERS):
            if len(payload) < 4:
                raise StreamProtocolError("SPDY SYN_REPLY/HEADERS frame too short")
            self._headers(payload[4:])  # keeps the shared zlib stream in step
        # RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE: nothing to record

    def _headers(self, block: bytes) -> dict[str, str]:
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise StreamProtocolError(f"SPDY header block does not decompress: {e}") from None
        if self._inflate.unconsumed_tail:
            raise StreamProtocolError("SPDY header block larger than botwarden reads")
        try:
            (count,) = struct.unpack_from(">I", raw)
            pos, headers = 4, {}
            for _ in range(count):
                (n,) = struct.unpack_from(">I", raw, pos)
                name = raw[pos + 4:pos + 4 + n].decode("latin-1").lower()
                pos += 4 + n
                (v,) = struct.unpack_from(">I", raw, pos)
                headers[name] = raw[pos + 4:pos + 4 + v].decode("latin-1")
                pos += 4 + v
                if pos > len(raw):
                    raise struct.error("past the end")
        except struct.error:
            raise StreamProtocolError("SPDY header block malformed") from None
        return headers


class SpdyStreams:
    """What both directions of one SPDY connection know: each stream's type (and port)."""

    def __init__(self) -> None:
        self.types: dict[int, str] = {}
        self.ports: dict[int, str] = {}

    def readers(self) -> tuple[SpdyReader, SpdyReader]:
        """(from the client, from the server)."""
        return SpdyReader(self), SpdyReader(self)


class WebSocketChannelReader:
    """One direction of a ``*.channel.k8s.io`` WebSocket (``base64.channel.k8s.io`` too):
    complete messages, split by their channel byte. ``from_client``: the client masks its frames."""

    def __init__(self, from_client: bool, base64: bool = False):
        # wsproto's FrameProtocol parses frames without a handshake; client=False reads what a
        # client sent (masked), client=True what a server sent.
        self._frames = FrameProtocol(client=not from_client, extensions=[])
        self._message = bytearray()
        self._base64 = base64
        self._head = bytearray()      # a frame header being read (_track)
        self._remaining = 0           # payload bytes until the current frame ends
        self._in_message = False      # a fragmented message has begun and not ended

    def feed(self, data: bytes) -> list[ChannelData]:
        self._track(data)
        self._frames.receive_bytes(data)
        out: list[ChannelData] = []
        try:
            for frame in self._frames.received_frames():
                if frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONTINUATION):
                    payload = frame.payload
                    self._message += payload.encode() if isinstance(payload, str) else payload
                    if len(self._message) > MAX_FRAME:
                        raise StreamProtocolError("WebSocket message larger than botwarden reads")
                    if frame.message_finished:
                        out.append(self._channel(bytes(self._message)))
                        self._message.clear()
        except (ParseFailed, WsProtocolError) as e:
            raise StreamProtocolError(f"WebSocket stream malformed: {e}") from None
        return [c for c in out if c.data or c.channel]

    @property
    def at_boundary(self) -> bool:
        """No frame, and no fragmented message, in progress (another message may follow)."""
        return not self._head and not self._remaining and not self._in_message

    def _track(self, data: bytes) -> None:
        """Frame boundaries of the raw stream (wsproto does not expose them): header sizes and
        payload lengths only."""
        pos, n = 0, len(data)
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                self._remaining -= take
                pos += take
                continue
            self._head.append(data[pos])
            pos += 1
            h = self._head
            if len(h) < 2:
                continue
            short = h[1] & 0x7F
            size = 2 + (2 if short == 126 else 8 if short == 127 else 0) + (4 if h[1] & 0x80 else 0)
            if len(h) < size:
                continue
            length = (short if short < 126 else int.from_bytes(h[2:4]) if short == 126
                      else int.from_bytes(h[2:10]))
            if h[0] & 0x0F < 8:  # a data frame: a message goes on until one with FIN
                self._in_message = not h[0] & 0x80
            self._remaining = length
            self._head.clear()

    def error_frame(self, status: bytes) -> bytes:
        """A message on the error channel (3), as a server sends it (unmasked)."""
        if self._base64:
            import base64
            payload = b"3" + base64.b64encode(status)
        else:
            payload = b"\x03" + status
        return FrameProtocol(client=False, extensions=[]).send_data(payload, fin=True)

    def _channel(self, message: bytes) -> ChannelData:
        if not message:
            return ChannelData("", b"")
        if self._base64:
            import base64
            ch = message[0] - ord("0")
            try:
                data = base64.b64decode(message[1:], validate=False)
            except ValueError:
                raise StreamProtocolError("base64.channel.k8s.io message is not base64") from None
        else:
            ch, data = message[0], message[1:]
        return ChannelData(CHANNELS.get(ch, ""), data)

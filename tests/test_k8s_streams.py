"""The readers of relayed exec/attach/port-forward streams (appliance/protocols/kubernetes/streams.py):
SPDY/3.1 frames with compressed headers and WebSocket channel messages, split at every byte,
and malformed input refused with StreamProtocolError (pure code, no servers)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from wsproto.frame_protocol import FrameProtocol

from appliance.protocols.kubernetes.streams import (SPDY3_DICTIONARY, ChannelData, SpdyStreams, StreamProtocolError,
                                                    WebSocketChannelReader)


class SpdyWriter:
    """SPDY/3.1 frames as kubectl writes them (one zlib stream for all header blocks)."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zdict=SPDY3_DICTIONARY)

    def _block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers)) + b"".join(
            struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode() for k, v in headers.items())
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def syn_stream(self, sid: int, headers: dict[str, str]) -> bytes:
        payload = struct.pack(">IIH", sid, 0, 0) + self._block(headers)
        return struct.pack(">II", 0x80030001, len(payload)) + payload

    def syn_reply(self, sid: int, headers: dict[str, str]) -> bytes:
        payload = struct.pack(">I", sid) + self._block(headers)
        return struct.pack(">II", 0x80030002, len(payload)) + payload

    @staticmethod
    def data(sid: int, data: bytes, fin: bool = False) -> bytes:
        return struct.pack(">II", sid, (0x01000000 if fin else 0) | len(data)) + data

    @staticmethod
    def ping(n: int) -> bytes:
        return struct.pack(">III", 0x80030006, 4, n)


def _exec_conversation() -> tuple[bytes, bytes]:
    client, server = SpdyWriter(), SpdyWriter()
    up = b"".join([client.syn_stream(1, {"streamtype": "error"}), client.syn_stream(3, {"streamtype": "stdin"}),
                   client.syn_stream(5, {"streamtype": "stdout"}), client.syn_stream(7, {"streamtype": "stderr"}),
                   client.data(3, b"typed secret\n"), client.ping(1), client.data(3, b"", fin=True)])
    status = json.dumps({"status": "Failure", "reason": "NonZeroExitCode",
                         "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}).encode()
    down = b"".join([server.syn_reply(1, {}), server.syn_reply(3, {}), server.syn_reply(5, {}),
                     server.syn_reply(7, {}), server.data(5, b"out\n"), server.data(7, b"err\n"),
                     server.data(5, b"more out\n"), server.data(1, status, fin=True)])
    return up, down


def _feed_split(reader, data: bytes, at: int) -> list[ChannelData]:
    return reader.feed(data[:at]) + reader.feed(data[at:])


def test_spdy_exec_channels_are_read_whatever_the_split() -> None:
    up, down = _exec_conversation()
    for cut in range(0, max(len(up), len(down)) + 1):
        from_client, from_server = SpdyStreams().readers()
        got_up = _feed_split(from_client, up, min(cut, len(up)))
        got_down = _feed_split(from_server, down, min(cut, len(down)))
        assert got_up == [ChannelData("stdin", b"typed secret\n")]
        assert [(c.channel, c.data) for c in got_down][:3] == [("stdout", b"out\n"), ("stderr", b"err\n"),
                                                                ("stdout", b"more out\n")]
        assert got_down[3].channel == "error" and json.loads(got_down[3].data)["reason"] == "NonZeroExitCode"


def test_spdy_port_forward_streams_carry_their_port() -> None:
    w = SpdyWriter()
    streams = SpdyStreams()
    from_client, _ = streams.readers()
    got = from_client.feed(w.syn_stream(1, {"streamtype": "data", "port": "8080", "requestid": "0"})
                           + w.data(1, b"GET / HTTP/1.0\r\n\r\n"))
    assert got == [ChannelData("data", b"GET / HTTP/1.0\r\n\r\n")] and streams.ports == {1: "8080"}


@pytest.mark.parametrize("frame, why", [
    (struct.pack(">II", 0x80020001, 10) + bytes(10), "version 2"),
    (struct.pack(">II", 0x80030001, 4) + bytes(4), "too short"),
    (struct.pack(">II", 0x80030001, 14) + struct.pack(">IIH", 1, 0, 0) + b"\xff\xff\xff\xff", "decompress"),
])
def test_malformed_spdy_is_refused_with_a_reason(frame: bytes, why: str) -> None:
    from_client, _ = SpdyStreams().readers()
    with pytest.raises(StreamProtocolError, match=why):
        from_client.feed(frame)


def test_spdy_header_block_that_lies_about_its_length_is_refused() -> None:
    deflate = zlib.compressobj(zdict=SPDY3_DICTIONARY)
    raw = struct.pack(">I", 1) + struct.pack(">I", 200) + b"x"  # a name said to be 200 bytes long
    block = deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIH", 1, 0, 0) + block
    from_client, _ = SpdyStreams().readers()
    with pytest.raises(StreamProtocolError, match="malformed"):
        from_client.feed(struct.pack(">II", 0x80030001, len(payload)) + payload)


def _ws_frames(messages: list[bytes], *, from_client: bool) -> bytes:
    # wsproto writes what a client (masked) or a server sends; client=True masks.
    proto = FrameProtocol(client=from_client, extensions=[])
    out = b""
    for m in messages:
        half = len(m) // 2
        out += proto.send_data(m[:half], fin=False) + proto.send_data(m[half:], fin=True)  # fragmented
    return out


def test_websocket_channels_are_read_whatever_the_split() -> None:
    down = _ws_frames([b"\x01out\n", b"\x02err\n", b"\x03" + b'{"status":"Success"}'], from_client=False)
    up = _ws_frames([b"\x00stdin bytes"], from_client=True)
    for cut in range(len(down) + 1):
        got = _feed_split(WebSocketChannelReader(from_client=False), down, cut)
        assert [(c.channel, c.data) for c in got] == [("stdout", b"out\n"), ("stderr", b"err\n"),
                                                       ("error", b'{"status":"Success"}')]
    for cut in range(len(up) + 1):
        assert _feed_split(WebSocketChannelReader(from_client=True), up, cut) == [ChannelData("stdin", b"stdin bytes")]


def test_base64_channel_messages_are_decoded() -> None:
    down = _ws_frames([b"1" + b"aGVsbG8K"], from_client=False)
    assert WebSocketChannelReader(from_client=False, base64=True).feed(down) == [ChannelData("stdout", b"hello\n")]


def test_an_unmasked_frame_from_a_client_is_refused() -> None:
    unmasked = _ws_frames([b"\x00x"], from_client=False)
    with pytest.raises(StreamProtocolError, match="WebSocket"):
        WebSocketChannelReader(from_client=True).feed(unmasked)


def test_frames_botwarden_adds_at_a_boundary_are_read_by_the_same_readers() -> None:
    # Session end: botwarden writes a Status on the error channel, between two frames only.
    up, down = _exec_conversation()
    from_client, from_server = SpdyStreams().readers()
    from_client.feed(up)
    assert from_server.feed(down[:5]) == [] and not from_server.at_boundary
    from_server.feed(down[5:])
    assert from_server.at_boundary
    frame = from_server.error_frame(b'{"status":"Failure","message":"ended"}')
    check_client, check_server = SpdyStreams().readers()
    check_client.feed(up)
    assert check_server.feed(down + frame)[-1] == ChannelData("error", b'{"status":"Failure","message":"ended"}')
    for b64 in (False, True):
        ws = WebSocketChannelReader(from_client=False, base64=b64)
        partial = _ws_frames([b"1aGVsbG8K" if b64 else b"\x01hello\n"], from_client=False)
        ws.feed(partial[:3])
        assert not ws.at_boundary  # mid-message (the first fragment is not FIN)
        ws.feed(partial[3:])
        assert ws.at_boundary
        got = WebSocketChannelReader(from_client=False, base64=b64).feed(partial + ws.error_frame(b"why"))
        assert got[-1] == ChannelData("error", b"why")


def test_the_spdy3_dictionary_is_the_one_kubectl_compresses_with() -> None:
    # zlib names a preset dictionary by its Adler-32 in the stream header (DICTID): kubectl's
    # (Go spdystream's) header blocks carry 0xe3c6a7c2 (3821447106); any other dictionary, even
    # one this module's own tests compress with, would fail on every real SYN_STREAM.
    import zlib

    from appliance.protocols.kubernetes.streams import SPDY3_DICTIONARY

    assert len(SPDY3_DICTIONARY) == 1423
    assert zlib.adler32(SPDY3_DICTIONARY) == 3821447106

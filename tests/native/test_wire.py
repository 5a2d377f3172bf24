"""Multipart receive and send through libzmq directly (zrouter/_native/wire.pyx) behave like
zrouter.transport's pyzmq versions: both implementations run every test, on real sockets."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zrouter import _speedups, _wire, transport
from zrouter.transport import NOBLOCK, free_tcp_endpoint

native = _speedups.load_native("wire")

class _Pure:
    """The pure path: transport's receive, _wire's send."""

    recv_frames = staticmethod(transport.recv_frames)
    recv_or_none = staticmethod(transport.recv_or_none)
    send_frames = staticmethod(_wire.send_frames)


IMPLS = [pytest.param(_Pure, id="pure"), pytest.param(transport, id="transport"), pytest.param(native, id="native")]


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def _pair(ctx: zmq.Context[Any], endpoint: str = "inproc://wire") -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind(endpoint)
    dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    return router, dealer


@pytest.mark.parametrize("impl", IMPLS)
def test_frames_arrive_whole_in_order_and_readable_every_way(ctx: zmq.Context[Any], impl: Any) -> None:
    router, dealer = _pair(ctx)
    big = bytes(range(256)) * 400  # over the 64 kB copy threshold: pyzmq sends it by reference
    impl.send_frames(dealer, [b"ZRT1", b"", bytearray(b"hdr"), memoryview(b"pay"), big])
    frames = impl.recv_frames(router)
    assert [f.bytes for f in frames[1:]] == [b"ZRT1", b"", b"hdr", b"pay", big]
    assert [f.more for f in frames] == [True] * 5 + [False]
    assert [len(f) for f in frames[1:]] == [4, 0, 3, 3, len(big)]
    assert bytes(frames[1].buffer) == b"ZRT1" and bytes(memoryview(frames[5])) == big
    # Forwarded as received (the broker's case): the same bytes come out the other side.
    impl.send_frames(router, frames, 0)
    back = impl.recv_frames(dealer)
    assert [f.bytes for f in back] == [b"ZRT1", b"", b"hdr", b"pay", big]


@pytest.mark.parametrize("impl", IMPLS)
def test_noblock_on_an_empty_socket_raises_again(ctx: zmq.Context[Any], impl: Any) -> None:
    router, _ = _pair(ctx)
    with pytest.raises(zmq.Again):
        impl.recv_frames(router, NOBLOCK)


@pytest.mark.parametrize("impl", IMPLS)
def test_recv_or_none_reads_what_is_queued_then_says_none(ctx: zmq.Context[Any], impl: Any) -> None:
    router, dealer = _pair(ctx)
    assert impl.recv_or_none(router) is None
    impl.send_frames(dealer, [b"a", b"b"])
    impl.send_frames(dealer, [b"c"])
    got = []
    while True:  # the loops that drain a socket: frames until None, never an exception
        frames = None
        for _ in range(1000):  # inproc delivery is asynchronous: poll rather than sleep
            frames = impl.recv_or_none(router)
            if frames is not None or len(got) == 2:
                break
            router.poll(100)
        if frames is None:
            break
        got.append([f.bytes for f in frames[1:]])
    assert got == [[b"a", b"b"], [b"c"]]
    assert impl.recv_or_none(router) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_an_unroutable_identity_is_refused_on_the_first_frame(ctx: zmq.Context[Any], impl: Any) -> None:
    router, dealer = _pair(ctx)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    with pytest.raises(zmq.ZMQError) as info:
        impl.send_frames(router, [b"nobody", b"ZRT1", b"x"], NOBLOCK)
    assert info.value.errno == errno.EHOSTUNREACH
    # Nothing half-sent: the next message goes through whole.
    impl.send_frames(dealer, [b"hello"])
    ident = impl.recv_frames(router)[0].bytes
    impl.send_frames(router, [ident, b"ZRT1", b"x"], NOBLOCK)
    assert [f.bytes for f in impl.recv_frames(dealer)] == [b"ZRT1", b"x"]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_full_pipe_refuses_under_noblock(ctx: zmq.Context[Any], impl: Any) -> None:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IMMEDIATE, 1)  # no pipe until a connection completes, and none will
    dealer.connect(free_tcp_endpoint())
    with pytest.raises(zmq.Again):
        impl.send_frames(dealer, [b"ZRT1", b"x"], NOBLOCK)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_closed_socket_raises_instead_of_touching_freed_memory(ctx: zmq.Context[Any], impl: Any) -> None:
    _router, dealer = _pair(ctx)
    dealer.close(0)
    with pytest.raises(zmq.ZMQError) as info:
        impl.recv_frames(dealer, NOBLOCK)
    assert info.value.errno == errno.ENOTSOCK
    with pytest.raises(zmq.ZMQError):
        impl.send_frames(dealer, [b"x"], NOBLOCK)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_frame_tells_the_fd_and_the_properties_it_came_with(ctx: zmq.Context[Any], impl: Any) -> None:
    router, dealer = _pair(ctx, free_tcp_endpoint())
    impl.send_frames(dealer, [b"ZRT1", b"x"])
    frames = impl.recv_frames(router)
    assert frames[0].get(zmq.SRCFD) > 2
    # Metadata properties by name, as the broker reads CURVE's "User-Id".
    assert frames[0].get("Socket-Type") == "DEALER" and frames[1].get(b"Socket-Type") == "DEALER"
    with pytest.raises(zmq.ZMQError):
        frames[0].get("No-Such-Property")


def test_received_frames_are_views_not_copies(ctx: zmq.Context[Any]) -> None:
    router, dealer = _pair(ctx)
    payload = b"p" * 1000
    native.send_frames(dealer, [payload])
    part = native.recv_frames(router)[1]
    view = part.buffer
    del part  # the view keeps the message alive
    assert bytes(view) == payload and view.readonly
    assert type(native.recv_frames).__name__ == "cython_function_or_method"


@pytest.mark.parametrize("impl", IMPLS)
def test_a_tracked_frame_is_released_only_once_sent(ctx: zmq.Context[Any], impl: Any) -> None:
    """The broker counts a client's unread reply bytes with tracked frames: the tracker must
    follow the very message libzmq sends (not a copy made on the way)."""
    router, dealer = _pair(ctx)
    impl.send_frames(dealer, [b"hello"])
    ident = impl.recv_frames(router)[0].bytes
    frame = zmq.Frame(b"r" * 1000, copy=False, track=True)
    impl.send_frames(router, (ident, b"ZRT1", frame), NOBLOCK)
    tracker = frame.tracker
    del frame
    # inproc: the message waits in the pipe, unread, so libzmq holds it (a copy sent in its
    # place would let the tracker finish as soon as pyzmq's garbage thread frees the frame)
    with pytest.raises(zmq.NotDone):
        tracker.wait(0.3)
    assert [f.bytes for f in impl.recv_frames(dealer)] == [b"ZRT1", b"r" * 1000]
    tracker.wait(5)
    assert tracker.done

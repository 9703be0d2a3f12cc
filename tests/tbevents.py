"""TensorBoard scalars read back from event files, as TensorBoard reads them: its own EventAccumulator
when the `tensorboard` package is installed, else the TFRecord framing parsed here (lengths and
CRC-32C checksums verified) with tensorboardX's `Event` protobuf."""

from __future__ import annotations

import struct
from pathlib import Path


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: Path) -> list[bytes]:
    raw, out, i = path.read_bytes(), [], 0
    while i < len(raw):
        header = raw[i:i + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[i + 8:i + 12])
        assert header_crc == _masked_crc(header), f"{path}: bad length checksum at {i}"
        data = raw[i + 12:i + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[i + 12 + length:i + 16 + length])
        assert len(data) == length and data_crc == _masked_crc(data), f"{path}: bad record at {i}"
        out.append(data)
        i += 16 + length
    return out


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file directly in `logdir`, in step order."""
    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    scalars: dict[str, list[tuple[int, float]]] = {}
    if EventAccumulator is not None:
        acc = EventAccumulator(str(logdir))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    else:
        from tensorboardX.proto.event_pb2 import Event

        for f in files:
            for data in _records(f):
                event = Event.FromString(data)
                for v in event.summary.value:
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return {tag: sorted(points) for tag, points in scalars.items()}

# The C loops of _blockloop.c (built optionally: import it inside try/except ImportError).
import numpy as np
import numpy.typing as npt

def blocks(
    fn: int, order: int, data: npt.NDArray[np.uint8], start: int, count: int, size: int,
    out: npt.NDArray[np.uint8], /,
) -> tuple[int, int]: ...

def gear_cuts(
    table: bytes, window: int, threshold: int, min_segment: int, max_segment: int, tail: bytes,
    data: bytes | bytearray | memoryview, pos: int, last: int, /,
) -> tuple[list[int], bytes, int, int]: ...

def deflate_job(
    fn: int, stream: int, data: bytes | bytearray | memoryview, cuts: bytes | bytearray | memoryview,
    final: bool, out: bytearray | memoryview, ends: bytearray | memoryview, /,
) -> tuple[int, int, int]: ...

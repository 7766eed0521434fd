"""A tiny ONNX model with u2net's input/output signature, for tests and the offline demo.

Real rembg weights come from GitHub, which tests and the demo cannot reach. This model takes what
u2net takes (float32 `input.1` [N,3,320,320], normalised the ImageNet way) and returns what u2net
returns (seven sigmoid maps `d0`..`d6` of shape [N,1,320,320]; rembg reads the first). Its mask is a
steep sigmoid of the pixel brightness, so bright objects on a dark background come out as
foreground: never constant (rembg divides by max - min), and predictable enough for tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imageselector.fsutil import atomic_write_bytes

INPUT_NAME = "input.1"
OUTPUT_NAMES = tuple(f"d{i}" for i in range(7))
SIZE = 320
STEEPNESS = 8.0  # per standard deviation of normalised brightness


def build_standin_u2net(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write the stand-in model to `path` and return it.

    size="tiny": brightness -> sigmoid (microseconds per image).
    size="small": adds a few random 3x3 convolutions (about 30k parameters) so inference has real work.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if size not in ("tiny", "small"):
        raise ValueError(f"size must be 'tiny' or 'small', not {size!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array(STEEPNESS, dtype=np.float32), "k"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("ReduceMean", [INPUT_NAME], ["bright"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["bright", "k"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logit0"]),
    ]
    logit = "logit0"
    if size == "small":
        chans = [3, 32, 32, 32, 1]
        x = INPUT_NAME
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
            nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
            x = f"c{i}"
            if i < len(chans) - 2:
                nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
                x = f"r{i}"
        inits.append(numpy_helper.from_array(np.array(0.1, dtype=np.float32), "texture"))
        nodes += [
            helper.make_node("Mul", [x, "texture"], ["tex"]),
            helper.make_node("Add", ["logit0", "tex"], ["logit1"]),
        ]
        logit = "logit1"
    for i, name in enumerate(OUTPUT_NAMES):
        if i == 0:
            nodes.append(helper.make_node("Sigmoid", [logit], [name]))
        else:  # side outputs: same map, slightly softer, like u2net's coarser heads
            inits.append(numpy_helper.from_array(np.array(1.0 / (1 + i), dtype=np.float32), f"s{i}"))
            nodes.append(helper.make_node("Mul", [logit, f"s{i}"], [f"l{i}"]))
            nodes.append(helper.make_node("Sigmoid", [f"l{i}"], [name]))
    batch = "batch_size"
    graph = helper.make_graph(
        nodes,
        f"u2net_standin_{size}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, 1, SIZE, SIZE]) for n in OUTPUT_NAMES],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="imageselector")
    model.ir_version = 8
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())
    return path

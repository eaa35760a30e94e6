"""The export package must never import torch, directly or indirectly (it runs on machines without torch)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_imports_without_torch():
    code = ("import export, export.qdq, export.runner, export.encodings, export.cli; import sys; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_export_pipeline_with_torch_unimportable(tmp_path):
    """Build a QDQ model and run it while `import torch` raises, as on a deployment machine."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch is not available on this machine')\n")
    code = textwrap.dedent("""
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper
        from export import Encodings, TensorEncoding, build_qdq, integer_kernel_report, run
        w = np.linspace(-1, 1, 2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
        g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [numpy_helper.from_array(w, "w")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        enc = Encodings()
        enc.add_activation(TensorEncoding.create("x", 2 / 255, -128, 8, False))
        enc.add_activation(TensorEncoding.create("y", 10 / 255, -128, 8, False))
        enc.add_param(TensorEncoding.create("w", [1 / 127, 1 / 127], 0, 8, True, channel_axis=0))
        q = build_qdq(m, enc)
        assert integer_kernel_report(q)["integer"] == 1
        assert run(q, np.zeros((1, 3, 5, 5), np.float32))[0].shape == (1, 2, 3, 3)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr

"""Export a sim to AIMET encodings + ONNX + QDQ ONNX, run the QDQ model as int8 in onnxruntime, compare with the sim
(docs/export.md includes it)."""
# [setup]
import os
import tempfile

import torch

from quantsim import QuantizationSimModel
from quantsim.data import evaluate, load_mnist5k, make_loader, train_classifier
from quantsim.models import SmallBNCNN

SMALL = os.environ.get("QUANTSIM_SNIPPET_SMALL") == "1"  # CI runs every snippet at a small size
OUT = os.environ.get("QUANTSIM_SNIPPET_OUT") or tempfile.mkdtemp(prefix="quantsim-export-")

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_mnist5k()
train_loader = make_loader(x_train, y_train, batch_size=64, shuffle=True)
test_loader = make_loader(x_test, y_test, batch_size=256)

model = SmallBNCNN(width=8 if SMALL else 16)
train_classifier(model, train_loader, epochs=1 if SMALL else 3, lr=0.1)
model.eval()

# onnxruntime_cpu: the sim also adds each bias on the int32 grid the integer kernels use
sim = QuantizationSimModel(model, config="onnxruntime_cpu", dummy_input=x_test[:1],
                           default_param_bw=8, default_output_bw=8)
sim.compute_encodings(train_loader, num_batches=8)

# [step_1]
paths = sim.export(OUT, "smallbncnn", dummy_input=x_test[:1])   # all four files or none
print(paths.onnx, paths.encodings, paths.qdq, paths.safetensors, sep="\n")

# [step_2]
from export import run

logits = run(paths.qdq, x_test.numpy(), batch=256)[0]            # onnxruntime, CPU provider
ort_top1 = float((logits.argmax(1) == y_test.numpy()).mean())
sim_top1 = evaluate(sim.model, test_loader)
print(f"top-1: sim {100 * sim_top1:.2f}%, onnxruntime int8 {100 * ort_top1:.2f}%")

# [step_3]
from quantsim.exporter import onnxruntime_fidelity

fidelity = onnxruntime_fidelity(sim, paths.qdq, x_test)          # in LSBs of the output quantizer
print(f"same top-1 class: {100 * fidelity['top1_agreement']:.2f}%, logits within 1 LSB: "
      f"{100 * fidelity['within_1']:.2f}% ({100 * fidelity['exact']:.2f}% bit-exact)")

# [step_4]
from export import integer_kernel_report

report = integer_kernel_report(paths.qdq, optimization="all")
print(f"{report['integer']}/{report['total']} Conv/Gemm/MatMul run as integer kernels: {report['kernels']}")
assert report["float"] == 0, [n["name"] for n in report["nodes"] if not n["integer"]]
assert fidelity["within_1"] >= 0.999 and abs(ort_top1 - sim_top1) <= 1 - fidelity["top1_agreement"] + 1e-9

# [step_5]
from quantsim.batchnorm import fold_all_batch_norms_to_scale

fold_all_batch_norms_to_scale(sim)                        # the deployment flow: BN folded, int32 bias simulated
paths = sim.export(OUT, "smallbncnn_folded", dummy_input=x_test[:1])
with sim.emulate_onnxruntime() as emulation:              # the sim computes what the integer kernels compute
    sim_logits = sim.model(x_test).numpy()
ort_logits = run(paths.qdq, x_test.numpy(), batch=256)[0]
same = float((sim_logits == ort_logits).mean())
print(f"emulated sim == onnxruntime on {100 * same:.2f}% of logits ({len(emulation.emulated)} layers emulated, "
      f"{len(emulation.skipped)} not)")
assert same >= 0.999 and not emulation.skipped, emulation.skipped
# [end]

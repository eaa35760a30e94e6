"""Load encodings that AIMET produced into a QuantizationSimModel (docs/migrating.md includes it)."""
# [setup]
import os
import tempfile

import numpy as np
import torch

from quantsim import fold_all_batch_norms
from quantsim.data import evaluate, load_mnist5k, make_loader, train_classifier
from quantsim.models import SmallBNCNN

SMALL = os.environ.get("QUANTSIM_SNIPPET_SMALL") == "1"  # CI runs every snippet at a small size
OUT = os.environ.get("QUANTSIM_SNIPPET_OUT") or tempfile.mkdtemp(prefix="quantsim-aimet-")

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_mnist5k()
train_loader = make_loader(x_train, y_train, batch_size=64, shuffle=True)
test_loader = make_loader(x_test, y_test, batch_size=256)

model = SmallBNCNN(width=8 if SMALL else 16)
train_classifier(model, train_loader, epochs=1 if SMALL else 3, lr=0.1)
model.eval()
fold_all_batch_norms(model)  # AIMET's PTQ flow folds BN before creating its sim: the file's weights are folded ones

# [aimet_file]
# Stand-in for the file AIMET's sim.export wrote (this snippet must run without AIMET): AIMET's 0.6.1 layout,
# written by export.encodings. Weights: symmetric 8-bit keyed by parameter path, per channel for convs and per
# tensor for the Gemm (AIMET's default config). Activations: asymmetric 8-bit keyed by the ONNX tensor names of
# the exported graph, ranges observed on 512 training images.
from export.encodings import Encodings, TensorEncoding, write_encodings

aimet_file = os.path.join(OUT, "aimet_model.encodings")
enc = Encodings(version="0.6.1", excluded_layers=[],
                quantizer_args={"activation_bitwidth": 8, "param_bitwidth": 8, "dtype": "int",
                                "is_symmetric": "True", "per_channel_quantization": "True",
                                "quant_scheme": "post_training_tf"})
for name in ("conv1.weight", "conv2.weight", "conv3.weight"):
    w = model.get_parameter(name).detach().numpy()
    absmax = np.abs(w.reshape(len(w), -1)).max(axis=1)
    enc.add_param(TensorEncoding.create(name, absmax / 127, 0, 8, symmetric=True, channel_axis=0))
enc.add_param(TensorEncoding.create("fc.weight", np.abs(model.fc.weight.detach().numpy()).max() / 127, 0, 8,
                                    symmetric=True))
ranges = {}
hooks = [model.get_submodule(m).register_forward_hook(
    lambda mod, inp, out, t=t: ranges.update({t: (min(0.0, out.min().item()), max(0.0, out.max().item()))}))
    for m, t in (("relu1", "/relu1/Relu_output_0"), ("relu2", "/relu2/Relu_output_0"),
                 ("relu3", "/relu3/Relu_output_0"), ("fc", "output"))]
with torch.no_grad():
    model(x_train[:512])
for h in hooks:
    h.remove()
ranges["input"] = (min(0.0, x_train[:512].min().item()), x_train[:512].max().item())
for tensor, (lo, hi) in ranges.items():
    scale = (hi - lo) / 255
    enc.add_activation(TensorEncoding.create(tensor, scale, round(lo / scale), 8, symmetric=False))
write_encodings(enc, aimet_file)

# [step_1]
from quantsim import QuantizationSimModel

sim = QuantizationSimModel(model, config="default", dummy_input=x_test[:1])   # same model and config as in AIMET
sim.load_encodings(aimet_file)    # 0.6.1, 1.0.0 or 2.0.0; every entry is checked before any quantizer changes

# [step_2]
print(f"FP32 top-1 {100 * evaluate(model, test_loader):.2f}%, "
      f"sim with AIMET's encodings {100 * evaluate(sim.model, test_loader):.2f}%")   # no compute_encodings needed
w1 = sim.model.conv1.param_quantizers["weight"]
assert np.array_equal(w1.get_scale().numpy(), enc.params["conv1.weight"].scale) and w1.frozen

# [step_3]
from export.encodings import read_encodings

params_only = read_encodings(aimet_file)
params_only.activations.clear()             # e.g. an AdaRound file, or activation names that differ from ours
sim = QuantizationSimModel(model, config="default", dummy_input=x_test[:1])
sim.load_encodings(params_only)             # loaded frozen: AIMET's set_and_freeze_param_encodings
sim.compute_encodings(train_loader, num_batches=8)    # calibrates the activations, keeps the loaded weights
assert np.array_equal(sim.model.conv1.param_quantizers["weight"].get_scale().numpy(),
                      enc.params["conv1.weight"].scale)
print(f"AIMET weights + calibrated activations: top-1 {100 * evaluate(sim.model, test_loader):.2f}%")

# [step_4]
from export.encodings import EncodingsError

w4 = QuantizationSimModel(model, config="default", dummy_input=x_test[:1], default_param_bw=4)
try:
    w4.load_encodings(aimet_file)
except EncodingsError as e:
    print("EncodingsError:", e)             # names the first entry that does not fit, nothing is changed
    assert e.tensor == "conv1.weight" and not w4.model.conv1.param_quantizers["weight"].is_initialized()
else:
    raise AssertionError("8-bit encodings must not load into a 4-bit sim")
# [end]

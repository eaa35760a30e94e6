"""PTQ quickstart: a small BN CNN on real MNIST digits, simulated at W8A8 (docs/quickstart.md includes it)."""
# [setup]
import os

import torch

from quantsim.data import evaluate, load_mnist5k, make_loader, train_classifier
from quantsim.models import SmallBNCNN

SMALL = os.environ.get("QUANTSIM_SNIPPET_SMALL") == "1"  # CI runs every snippet at a small size

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_mnist5k()
train_loader = make_loader(x_train, y_train, batch_size=64, shuffle=True)
test_loader = make_loader(x_test, y_test, batch_size=256)

model = SmallBNCNN(width=8 if SMALL else 16)
train_classifier(model, train_loader, epochs=1 if SMALL else 3, lr=0.1)
model.eval()

# [step_1]
from quantsim import QuantizationSimModel

sim = QuantizationSimModel(model, config="default", quant_scheme="min_max",
                           default_param_bw=8, default_output_bw=8)

# [step_2]
sim.compute_encodings(train_loader, num_batches=8)

# [step_3]
print(sim)
fp32 = evaluate(model, test_loader)
w8a8 = evaluate(sim.model, test_loader)
print(f"FP32 top-1 {100 * fp32:.2f}%   W8A8 sim top-1 {100 * w8a8:.2f}%")
assert abs(fp32 - w8a8) < 0.02, "W8A8 should be within 2 pp of float on this model"
# [end]

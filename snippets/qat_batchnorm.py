"""QAT with BatchNorm kept unfolded, BN re-estimation, fold to scale (docs/batchnorm.md includes it)."""
# [setup]
import os

import torch
import torch.nn.functional as F

from quantsim.data import evaluate, load_mnist5k, make_loader, train_classifier
from quantsim.models import SmallBNCNN

SMALL = os.environ.get("QUANTSIM_SNIPPET_SMALL") == "1"  # CI runs every snippet at a small size

torch.manual_seed(0)
x_train, y_train, x_test, y_test = load_mnist5k()
if SMALL:
    x_train, y_train = x_train[:1024], y_train[:1024]
train_loader = make_loader(x_train, y_train, batch_size=64, shuffle=True)
test_loader = make_loader(x_test, y_test, batch_size=256)

model = SmallBNCNN(width=8 if SMALL else 16)
train_classifier(model, train_loader, epochs=1 if SMALL else 3, lr=0.1)
model.eval()

# [sim]
from quantsim import QuantizationSimModel

sim = QuantizationSimModel(model, config="default", quant_scheme="min_max",
                           default_param_bw=4, default_output_bw=8)
sim.compute_encodings(train_loader, num_batches=8, progress=False)

# [qat]
optimizer = torch.optim.SGD(sim.model.parameters(), lr=0.01, momentum=0.9)
sim.model.train()  # BatchNorm normalises with batch statistics and updates its running statistics
for epoch in range(1 if SMALL else 2):
    for x, y in train_loader:
        optimizer.zero_grad()
        F.cross_entropy(sim.model(x), y).backward()
        optimizer.step()
sim.model.eval()
after_qat = evaluate(sim.model, test_loader)

# [reestimate]
from quantsim import reestimate_bn_stats

reestimate_bn_stats(sim.model, train_loader, num_batches=100, progress=False)
after_reestimation = evaluate(sim.model, test_loader)

# [fold]
from quantsim import fold_all_batch_norms_to_scale

folded = fold_all_batch_norms_to_scale(sim)
after_fold = evaluate(sim.model, test_loader)
print(f"folded {list(folded)}")
print(f"top-1: after QAT {100 * after_qat:.2f}%, after BN re-estimation {100 * after_reestimation:.2f}%, "
      f"after folding {100 * after_fold:.2f}%")
assert abs(after_fold - after_reestimation) <= 0.002, "folding keeps the integer weights: accuracy must not move"
# [end]

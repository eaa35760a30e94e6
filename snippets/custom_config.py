"""Writing a custom backend config in AIMET's JSON schema, and what a mistake in it looks like."""
# [setup]
import json
import tempfile

import torch
from torch import nn

from quantsim import ConfigError, QuantizationSimModel

model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Flatten(), nn.LazyLinear(10)).eval()
model(torch.randn(1, 3, 8, 8))  # materialise the lazy layer

# [step_1]
config = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "False"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "True",            # int8 weights in [-127, 127]
        "per_channel_quantization": "True",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Gemm": {"per_channel_quantization": "False"}},
    "supergroups": [{"op_list": ["Conv", "Clip"]}],   # Conv -> (BN) -> ReLU6 runs fused: one quantizer at the end
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(config, f)

# [step_2]
sim = QuantizationSimModel(model, config=f.name, default_param_bw=4)   # a path, a dict or a preset name
print(sim)
conv = sim.model[0]
assert conv.output_quantizers[0] is None and sim.model[2].output_quantizers[0] is not None
assert conv.param_quantizers["weight"].qmin == -7                    # strict symmetric 4-bit grid

# [step_3]
config["op_type"]["Conv"] = {"is_symetric": "True"}                  # a typo
try:
    QuantizationSimModel(model, config=config)
except ConfigError as e:
    print("ConfigError:", e)                                         # names the JSON path and suggests the key
# [end]

"""QAT with DistributedDataParallel: calibration, BN re-estimation and export across ranks (docs/scaling.md).

    torchrun --nproc_per_node=2 snippets/ddp_qat.py   # torchrun starts one process per rank
    python snippets/ddp_qat.py                         # starts 2 local gloo processes itself
"""
# [setup]
import hashlib
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from quantsim import QuantizationSimModel, reestimate_and_fold
from quantsim.data import evaluate, load_mnist5k, make_loader, train_classifier
from quantsim.models import SmallBNCNN

SMALL = os.environ.get("QUANTSIM_SNIPPET_SMALL") == "1"  # CI runs every snippet at a small size
OUT = os.environ.get("QUANTSIM_SNIPPET_OUT") or os.path.join(tempfile.gettempdir(), "quantsim-ddp-qat")


def main() -> None:
    """Runs on every rank; torch.distributed is initialised (gloo here, nccl on GPUs)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x_train, y_train, x_test, y_test = load_mnist5k()
    if SMALL:
        x_train, y_train = x_train[:1024], y_train[:1024]
    torch.manual_seed(0)  # the same float model on every rank (DDP would broadcast rank 0's weights anyway)
    model = SmallBNCNN(width=8 if SMALL else 16)
    train_classifier(model, make_loader(x_train, y_train, batch_size=64, shuffle=True), epochs=1 if SMALL else 3,
                     lr=0.1)
    float_top1 = evaluate(model, make_loader(x_test, y_test, batch_size=500))

    # [sim]
    train_set = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)  # each rank gets its own 1/world of the data
    train_loader = DataLoader(train_set, batch_size=64, sampler=sampler)

    sim = QuantizationSimModel(model.eval(), config="default", quant_scheme="tf_enhanced",
                               default_param_bw=4, default_output_bw=8)
    sim.compute_encodings(train_loader, num_batches=4, progress=False)  # statistics of all ranks' batches

    # [qat]
    ddp_model = DistributedDataParallel(sim.model)  # quantizer scales/offsets are ordinary parameters and buffers
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.01, momentum=0.9)
    ddp_model.train()
    for epoch in range(1 if SMALL else 2):
        sampler.set_epoch(epoch)
        for x, y in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(ddp_model(x), y).backward()  # gradients averaged over the ranks
            optimizer.step()

    # [fold]
    reestimate_and_fold(sim, train_loader, num_batches=8 if SMALL else 100, progress=False)  # all ranks' samples
    top1 = evaluate(sim.model, make_loader(x_test, y_test, batch_size=500))

    # [export]
    os.makedirs(OUT, exist_ok=True)
    paths = sim.export(OUT, "smallbncnn_ddp", dummy_input=x_test[:1])  # rank 0 writes; the others wait for it

    # [check]
    state = sim.model.state_dict()
    digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()[:16]
    everyone = [None] * world
    dist.all_gather_object(everyone, (top1, digest))
    assert len(set(everyone)) == 1, f"ranks disagree: {everyone}"
    if rank == 0:
        print(f"{world} ranks, identical weights and encodings (sha256 {digest}); top-1: float "
              f"{100 * float_top1:.2f}%, W4A8 after QAT, BN re-estimation and folding {100 * top1:.2f}%; "
              f"wrote {paths.qdq}")


# [launch]
if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun, which set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        dist.init_process_group("gloo")
        try:
            main()
        finally:
            dist.destroy_process_group()
    else:  # plain `python`: two local processes, each running main() in an initialised gloo group
        from quantsim.distributed import launch

        launch(main, nprocs=2)
# [end]

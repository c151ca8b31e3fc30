"""The authors' WCL network in PyTorch, for the import tests (needs torch + torchvision).

An independent reference: torchvision's resnet50 (the authors' network/resnet.py has its
names and layout; their ResNet has no fc) and a 3-layer head written here after the
authors' network/head.py ProjectionHead (Linear -> BatchNorm1d on (N, C, 1, 1) -> ReLU,
twice, then Linear), with random weights and non-trivial BatchNorm statistics. `save`
writes the files their scripts write (wcl.py and linear_eval.py's torch.save calls).
"""

import collections

import torch
import torchvision


class ProjectionHead(torch.nn.Module):
    def __init__(self, dim_in, dim_hidden, dim_out):
        super().__init__()
        self.linear1 = torch.nn.Linear(dim_in, dim_hidden)
        self.bn1 = torch.nn.BatchNorm1d(dim_hidden)
        self.relu1 = torch.nn.ReLU()
        self.linear2 = torch.nn.Linear(dim_hidden, dim_hidden)
        self.bn2 = torch.nn.BatchNorm1d(dim_hidden)
        self.relu2 = torch.nn.ReLU()
        self.linear3 = torch.nn.Linear(dim_hidden, dim_out)

    @staticmethod
    def _bn(bn, x):
        # As the authors' head (network/head.py lines 35-39): BatchNorm on a (N, C, 1, 1)
        # tensor. Their BatchNorm1d modules are SyncBatchNorm after convert_sync_batchnorm
        # (wcl.py line 100), which takes 4-D input; torch's BatchNorm1d refuses it, so the
        # same computation is called functionally here.
        y = torch.nn.functional.batch_norm(
            x[:, :, None, None], bn.running_mean, bn.running_var, bn.weight, bn.bias,
            bn.training, bn.momentum, bn.eps)
        return y[:, :, 0, 0]

    def forward(self, x):
        x = self.relu1(self._bn(self.bn1, self.linear1(x)))
        x = self.relu2(self._bn(self.bn2, self.linear2(x)))
        return self.linear3(x)


def resnet50():
    net = torchvision.models.resnet50()
    del net.fc  # The authors' ResNet has none (network/resnet.py line 114).
    net.fc = torch.nn.Identity()
    return net


class WCL(torch.nn.Module):
    def __init__(self, hidden=4096, out=256):
        super().__init__()
        self.net = resnet50()
        self.head1 = ProjectionHead(2048, hidden, out)
        self.head2 = ProjectionHead(2048, hidden, out)


class LinearHead(torch.nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.net = resnet50()
        self.fc = torch.nn.Linear(2048, num_classes)


def randomise(model, seed=0):
    """Random BatchNorm affine parameters and running statistics (the defaults 0/1 would
    hide a wrong mapping of them), random biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.num_batches_tracked.fill_(1234)
    return model.eval()


def state_dict(model, prefix=""):
    return collections.OrderedDict((prefix + k, v) for k, v in model.state_dict().items())


def save(model, path, fmt, dtype=None):
    """fmt: "ddp" ({"model": module.* state dict, "optimizer": SGD state with momentum,
    "epoch"}, as wcl.py), "plain" (the same without module.), "bare" (a state dict),
    "linear" ({"model", "optimizer", "scheduler", "epoch"} of DDP(LinearHead))."""
    prefix = "module." if fmt in ("ddp", "linear") else ""
    sd = state_dict(model, prefix)
    if dtype is not None:
        sd = collections.OrderedDict(
            (k, v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items())
    if fmt == "bare":
        torch.save(sd, path)
        return
    params = [p for p in model.parameters()]
    # lr 0: the step fills the momentum buffers and leaves the weights as they are.
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # momentum buffers: as large as the parameters
    for p in params:
        p.grad = None
    payload = {"model": sd, "optimizer": optimizer.state_dict(), "epoch": 200}
    if fmt == "linear":
        payload["scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=10).state_dict()
    torch.save(payload, path)

import pytest
import torch

CUDA = torch.cuda.is_available()

# Every parity test runs on the CPU, and on CUDA too wherever a GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# cuDNN's RNN kernels may use TF32 by default, which is not float32 accuracy; parity
# against it must compare like with like.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

"""Run LMDeploy 0.7.3's own `lmdeploy convert` on a CPU-only machine, to cross-check puyu's writer.

LMDeploy's converter is pure Python, but its package imports the CUDA engine (`_turbomind`) and moves every tensor
to the GPU. Here the extension is replaced by an empty module and `.cuda()` is the identity. For XComposer2 its
vision module needs `transformers.utils.is_safetensors_available` (gone in transformers 5) and asks the checkpoint's
remote code which XComposer2 variant it is (a tiny checkpoint has no remote code: the answer is plain XComposer2,
LoRA rank 256 for every linear). Nothing else changes.
Usage: python lmdeploy_cpu_convert.py SRC DST TP MODEL_FORMAT [SRC DST TP MODEL_FORMAT ...] (one import for all)
"""
import sys
import types


class _NoEngine(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


sys.modules["_turbomind"] = _NoEngine("_turbomind")
sys.modules.setdefault("fire", types.ModuleType("fire"))  # only used by its __main__

import torch  # noqa: E402

torch.Tensor.cuda = lambda self, *args, **kwargs: self
torch.cuda.empty_cache = lambda: None

import transformers.utils  # noqa: E402

transformers.utils.is_safetensors_available = lambda: True

from lmdeploy.turbomind.deploy.converter import main  # noqa: E402
import lmdeploy.vl.model.xcomposer2 as _xc2  # noqa: E402

_xc2.get_xcomposer_type = lambda model_path: (_xc2.ModelType.XCOMPOSER2, None)

if __name__ == "__main__":
    args = sys.argv[1:]
    for i in range(0, len(args), 4):
        src, dst, tp, fmt = args[i], args[i + 1], int(args[i + 2]), args[i + 3]
        main("tiny", src, model_format=fmt, dst_path=dst, tp=tp, chat_template="internlm2")

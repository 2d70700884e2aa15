"""What other libraries do to a model still computes the model: hooks on children (accelerate's offloading, forward
hooks), wrapped or parametrized modules (PEFT LoRA and `target_parameters`), tensor subclasses as weights
(quantisation). The one-call decoding step stands aside for all of them; generate() equals a greedy forward loop.
All but the accelerate offloading tests run on the test device (`--device`)."""

import copy

import accelerate
import pytest
import torch
from torch.nn.utils import parametrize

from modeling_slstm.slstm_op import use_backend

from conftest import random_model


IDS = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))  # drawn on the CPU: moved where used


def greedy_loop(model, ids, new_tokens):
    """Greedy decoding by full forwards without a cache: the oracle of generate()."""
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def one_call(block, width: int = 32) -> bool:
    """Whether a decoding step (no autograd) of one row runs `block` in one kernel call on its device."""
    with torch.no_grad():
        return block._decodes_in_one_call(torch.zeros(1, 1, width, device=block.slstm_norm.weight.device))


def generate(model, ids=None, new_tokens=6):
    """Greedy generate() from `ids` (default: IDS on the model's device)."""
    ids = IDS.to(model.device) if ids is None else ids
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False)


class Scaled(torch.Tensor):
    """A hand-made tensor subclass standing for a quantised weight: its data pointer holds 2x the value it stands for,
    so only code that goes through torch ops (__torch_function__) computes the right thing."""

    @staticmethod
    def __new__(cls, value: torch.Tensor):
        return torch.Tensor._make_subclass(cls, value.detach() * 2.0, False)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.as_subclass(torch.Tensor) * 0.5 if isinstance(x, Scaled) else x

        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


@pytest.mark.parametrize("where", ["slstm.recurrent_kernel", "slstm.conv.conv.weight", "ffn.gate_up_proj.weight"])
def test_tensor_subclass_weights_take_the_pytorch_path(where, device):
    model = random_model().to(device)
    expected = generate(model)
    assert one_call(model.model.layers[0]) == (device.type == "cpu")  # the kernels' step, before the subclass
    for block in model.model.layers:
        owner_name, _, name = where.rpartition(".")
        owner = block.get_submodule(owner_name)
        weight = Scaled(owner._parameters.pop(name))  # no longer a Parameter: a plain attribute holding the subclass
        setattr(owner, name, weight)
        assert not one_call(block)
    assert torch.equal(generate(model), expected)
    assert torch.equal(generate(model), greedy_loop(model, IDS.to(device), 6))


def test_torchao_int8_weight_only_generate_equals_the_greedy_loop(device):
    """On the CPU the int8 weights decode on the kernels (tests/test_int8_decoding.py), elsewhere through torchao."""
    quantization = pytest.importorskip("torchao.quantization")
    model = random_model(hidden_size=64, ffn_proj_factor=2.0).to(device)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    assert one_call(model.model.layers[0], 64) == (device.type == "cpu")
    assert torch.equal(generate(model), greedy_loop(model, IDS.to(device), 6))


@pytest.mark.parametrize("offload", ["cpu_offload", "disk_offload"])
def test_accelerate_offload_gives_the_in_memory_logits_stable_across_calls(offload, tmp_path):
    """CPU only: accelerate's CPU and disk offloading, executing on the CPU, against the in-memory model there."""
    model = random_model()
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0  # the masked conv path too
    with torch.no_grad():
        expected = [model(IDS).logits, model(IDS, attention_mask=mask).logits]
    expected_tokens = generate(model, IDS)
    offloaded = copy.deepcopy(model)
    if offload == "cpu_offload":
        accelerate.cpu_offload(offloaded, execution_device="cpu")
    else:
        accelerate.disk_offload(offloaded, str(tmp_path), execution_device="cpu")
    assert offloaded.model.layers[0].slstm.conv.conv.weight.device.type == "meta"
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(offloaded(IDS).logits, expected[0])
            assert torch.equal(offloaded(IDS, attention_mask=mask).logits, expected[1])
    assert torch.equal(generate(offloaded, IDS), expected_tokens)  # its parameters are on meta: the ids say cpu


def test_forward_hooks_on_the_conv_run_on_every_path(device):
    """Prefill, masked prefill and one-token steps all call the nn.Conv1d child, so its hooks see every call."""
    model = random_model().to(device)
    ids = IDS.to(device)
    calls = []
    for block in model.model.layers:
        block.slstm.conv.conv.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad(), use_backend("fused"):
        model(ids)
        model(ids, attention_mask=mask)
    tokens = generate(model, new_tokens=3)
    # two forwards of two blocks, then generate(): its prefill in two parts (the prompt but its last token, then that
    # token as a decoding step) and two steps, each through two blocks
    assert len(calls) == 2 * 2 + 2 * 4
    assert torch.equal(tokens, greedy_loop(model, ids, 3))


class Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2.0 * weight


def test_a_parametrized_weight_takes_the_module_path(device):
    model = random_model().to(device)
    assert one_call(model.model.layers[0]) == (device.type == "cpu")
    for block in model.model.layers:
        parametrize.register_parametrization(block.ffn.down_proj, "weight", Doubled())
        assert not one_call(block)
    assert torch.equal(generate(model), greedy_loop(model, IDS.to(device), 6))


@pytest.mark.allow_deprecation("`is_gradient_checkpointing` is deprecated")  # peft reads transformers' old name
@pytest.mark.parametrize("target_parameters", [None, ["slstm.recurrent_kernel"]])
def test_peft_lora_generate_equals_the_merged_model(target_parameters, device):
    peft = pytest.importorskip("peft")
    model = random_model().to(device)
    config = peft.LoraConfig(r=2, target_modules=["gate_up_proj", "down_proj"], init_lora_weights=False,
                             target_parameters=target_parameters)
    adapted = peft.get_peft_model(model, config)
    tokens = generate(adapted)
    merged = adapted.merge_and_unload()
    assert torch.equal(tokens, generate(merged))
    assert torch.equal(tokens, greedy_loop(merged, IDS.to(device), 6))

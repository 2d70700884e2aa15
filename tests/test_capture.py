"""Program capture of the model forward on the default backend: torch.compile(fullgraph=True), torch.export and
torch.jit.trace record the kernels as `slstm::` op nodes and agree with eager (and the reference), also on inputs
other than the ones traced with. CPU only: the captured ops are the C++ kernels of the compiled backend (`slstm::scan`,
`slstm::block_decode`), which take CPU tensors only; on another device other kernels run."""

import pytest
import torch

from modeling_slstm import slstm_cpu
from modeling_slstm.slstm_op import use_backend

from conftest import random_model


class Logits(torch.nn.Module):
    """(ids, attention_mask) -> logits, without a cache: the traceable part of the model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask):
        return self.model(ids, attention_mask=attention_mask, use_cache=False, return_dict=False)[0]


@pytest.fixture
def setup():
    if not slstm_cpu.compiled_available():
        pytest.skip("the C++ kernel cannot be built here")
    model = random_model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    other_ids = torch.randint(0, 61, (2, 9), generator=gen)
    other_mask = torch.ones_like(ids)
    other_mask[0, :4] = 0  # left padding the capture never saw
    return Logits(model), (ids, mask), (other_ids, other_mask)


def expected(wrapper, args):
    with torch.no_grad():
        eager = wrapper(*args)
        with use_backend("reference"):
            reference = wrapper(*args)
    torch.testing.assert_close(eager, reference, rtol=1e-5, atol=1e-5)
    return eager


@pytest.mark.allow_deprecation("`torch.jit.script_method` is deprecated")  # torch's own, inside inductor
def test_torch_compile_fullgraph_matches_eager(setup):
    wrapper, args, other = setup
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(wrapper, fullgraph=True, backend=record)
    with torch.no_grad():
        for inputs in (args, other):
            torch.testing.assert_close(compiled(*inputs), expected(wrapper, inputs), rtol=1e-5, atol=1e-5)
    assert any("slstm.scan" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    inductor = torch.compile(wrapper, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(inductor(*other), expected(wrapper, other), rtol=1e-5, atol=1e-5)


def test_torch_compile_trains_through_the_registered_autograd(setup):
    wrapper, args, _ = setup
    compiled = torch.compile(wrapper, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (wrapper, compiled):
        wrapper.zero_grad()
        fn(*args).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in wrapper.parameters()])
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-6)


def test_torch_export_matches_eager(setup):
    wrapper, args, other = setup
    program = torch.export.export(wrapper, args)
    assert sum("slstm.scan" in str(node.target) for node in program.graph.nodes) == 2  # one per block
    with torch.no_grad():
        for inputs in (args, other):
            torch.testing.assert_close(program.module()(*inputs), expected(wrapper, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.allow_deprecation("`torch.jit.trace")  # torch 2.13 deprecates jit.trace, the API under test
@pytest.mark.allow_deprecation("`is_gradient_checkpointing` is deprecated")  # jit.trace reads every attribute
def test_jit_trace_is_exact(setup):
    wrapper, args, other = setup
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, args, check_trace=False)
        assert any(node.kind() == "slstm::scan" for node in traced.inlined_graph.nodes())
        for inputs in (args, other):
            torch.testing.assert_close(traced(*inputs), expected(wrapper, inputs), rtol=1e-5, atol=1e-5)


class Block(torch.nn.Module):
    """One block on one token, no cache: the one-call decoding step."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, mask):
        return self.block(x, mask)


@pytest.mark.allow_deprecation("`torch.jit.trace")  # torch 2.13 deprecates jit.trace, the API under test
def test_the_decoding_step_is_captured_as_one_op(setup):
    wrapper, _, _ = setup
    block = Block(wrapper.model.model.layers[0])
    gen = torch.Generator().manual_seed(1)
    x, other = torch.randn(3, 1, 32, generator=gen), torch.randn(3, 1, 32, generator=gen)
    mask, other_mask = torch.tensor([[True], [False], [True]]), torch.tensor([[False], [True], [True]])
    with torch.no_grad():
        expected = block(other, other_mask)
        with use_backend("reference"):
            torch.testing.assert_close(block(other, other_mask), expected, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(block, (x, mask), check_trace=False)
        program = torch.export.export(block, (x, mask))
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        assert any(node.kind() == "slstm::block_decode" for node in traced.inlined_graph.nodes())
        assert any("slstm.block_decode" in str(node.target) for node in program.graph.nodes)
        for run in (traced, program.module(), compiled):
            torch.testing.assert_close(run(other, other_mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.allow_deprecation("`torch.jit.trace")  # torch 2.13 deprecates jit.trace, the API under test
@pytest.mark.allow_deprecation("`is_gradient_checkpointing` is deprecated")  # jit.trace reads every attribute
def test_the_model_decoding_step_is_captured_with_its_kernels(setup):
    """One token through the whole model: every block and the final norm in one `slstm::block_decode` node and the LM
    head on a kernel too (in that node, or in `slstm::linear_decode` where the exporter wraps module calls, which the
    causal LM then does not skip), under torch.compile, torch.export and torch.jit.trace, each as eager on a mask the
    capture never saw."""
    wrapper, _, _ = setup
    gen = torch.Generator().manual_seed(2)
    ids, other = torch.randint(0, 61, (3, 1), generator=gen), torch.randint(0, 61, (3, 1), generator=gen)
    mask, other_mask = torch.tensor([[1], [0], [1]]), torch.tensor([[0], [1], [1]])
    with torch.no_grad():
        expected = wrapper(other, other_mask)
        program = torch.export.export(wrapper, (ids, mask))
        targets = [str(node.target) for node in program.graph.nodes]
        assert sum("slstm.block_decode" in t for t in targets) == 1 and sum("slstm.linear_decode" in t for t in targets) <= 1
        assert not any("layer_norm" in t or "aten.linear" in t or "aten.mm" in t for t in targets), targets
        traced = torch.jit.trace(wrapper, (ids, mask), check_trace=False)
        compiled = torch.compile(wrapper, fullgraph=True, backend="aot_eager")
        for run in (program.module(), traced, compiled):
            torch.testing.assert_close(run(other, other_mask), expected, rtol=1e-5, atol=1e-5)

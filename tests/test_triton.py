"""The Triton kernels ("triton" backend) against the reference op: values and gradients wrt every input, masks,
initial states, chunked calls, head dims 8-512 (R on chip up to 64, streamed above; the presets' 192 and 256
included) and the fallback beyond, bfloat16, the boundary, and the whole model.

Without a GPU they run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, numpy); with `--device cuda`
the same tests compile and run the kernels on the GPU. Shapes are ones a GPU compile accepts (`tl.dot` tiles of at
least 16 per dimension: heads are padded to 16, batch rows come in blocks of 16). They skip when triton is absent
(`pip install -e ".[gpu-test]"`)."""

import importlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from modeling_slstm import slstm_op
from modeling_slstm.slstm_op import slstm_scan, slstm_scan_reference, use_backend

from conftest import (MASK_KINDS, assert_rel_close, mask_of_kind, random_model, scan_inputs,
                      scan_values_and_grads)


@pytest.fixture(scope="module")
def kernels(device):
    """modeling_slstm.slstm_triton, interpreted when the tests run on CPU."""
    pytest.importorskip("triton")
    if device.type == "cpu":
        pytest.importorskip("numpy")  # the interpreter's arrays
        # Read when the kernels are defined (at import) and while they run: set for the rest of the session.
        os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module("modeling_slstm.slstm_triton")
    if device.type == "cpu" and not module.INTERPRETED:
        pytest.skip("slstm_triton was imported without TRITON_INTERPRET=1: its kernels cannot take CPU tensors")
    return module


def on_triton(*args):
    with use_backend("triton"):
        return slstm_scan(*args)


def check(B, S, NH, DH, device, mask=None, forget_gate="sigmoid", tol=1e-5, fn=on_triton, **kw):
    gates, R, b, state = scan_inputs(B, S, NH, DH, device=device, **kw)
    mask = None if mask is None else mask.to(device)
    ref_vals, ref_grads = scan_values_and_grads(slstm_scan_reference, gates, R, b, state, mask, forget_gate)
    vals, grads = scan_values_and_grads(fn, gates, R, b, state, mask, forget_gate)
    assert_rel_close(vals, ref_vals, tol, "values")
    assert_rel_close(grads, ref_grads, tol, "grads")


# On chip: 8, 16, 24, 32, 48, 64 (8, 24, 48 padded to the next power of two >= 16); streamed: 96, 192 and 256 (the
# 125m and 350m presets' heads), 512 (1.3b's, the limit).
@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 48, 64, 96, 192, 256, 512])
def test_matches_reference_across_head_dims(kernels, device, head_dim):
    mask = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    check(3, 3, 2 if head_dim < 512 else 1, head_dim, device, mask=mask)


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 7, 4, 8), (20, 3, 1, 16), (33, 2, 2, 8)])  # B > 16: 2-3 blocks
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference_across_shapes(kernels, device, shape, with_state):
    check(*shape, device, with_state=with_state)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks(kernels, device, kind, forget_gate):
    B, S = 4, 9
    mask = mask_of_kind(kind, B, S, starts=[0, 2, 5, 8])
    check(B, S, 2, 16, device, mask=mask, forget_gate=forget_gate)
    check(B, S, 2, 16, device, mask=mask, forget_gate=forget_gate, with_state=False)
    check(B, S, 1, 80, device, mask=mask, forget_gate=forget_gate)  # the streamed kernels


def test_exp_forget_gate_and_large_preactivations(kernels, device):
    check(3, 9, 2, 16, device, forget_gate="exp")
    check(3, 9, 2, 16, device, scale=30.0)  # saturated gates, the stabiliser far from zero
    check(3, 9, 2, 32, device, scale=30.0, forget_gate="exp")


@pytest.mark.parametrize("cuts, head_dim", [((1,), 16), ((4, 5), 16), ((3,), 80)])
def test_chunked_calls_carry_state_and_gradients(kernels, device, cuts, head_dim):
    B, S = 3, 9
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(4)).to(device) > 0.3

    def chunked(g, r, bias, st, m, forget_gate):
        outs, bounds = [], [0, *cuts, S]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            out, st = on_triton(g[:, lo:hi], r, bias, st, m[:, lo:hi], forget_gate)
            outs.append(out)
        return torch.cat(outs, 1), st

    check(B, S, 2, head_dim, device, mask=mask, fn=chunked)


def test_bfloat16_inputs_with_float32_state(kernels, device):
    gates, R, b, state = scan_inputs(3, 9, 2, 16, device=device)
    ref_out, ref_state = slstm_scan_reference(gates, R, b, state)
    out, final = on_triton(gates.bfloat16(), R.bfloat16(), b.bfloat16(), state)
    assert out.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in final)
    assert_rel_close([out.float(), final[0]], [ref_out, ref_state[0]], 1e-2, "bf16")  # 8-bit mantissa inputs
    gates_bf, R_bf = gates.bfloat16().requires_grad_(), R.bfloat16().requires_grad_()
    out, _ = on_triton(gates_bf, R_bf, b, state)
    out.float().sum().backward()
    assert gates_bf.grad.dtype == torch.bfloat16 and R_bf.grad.dtype == torch.bfloat16
    assert torch.isfinite(gates_bf.grad.float()).all()


def test_empty_sequence_returns_the_initial_state(kernels, device):
    gates, R, b, state = scan_inputs(2, 0, 2, 16, device=device)
    out, final = on_triton(gates, R, b, state)
    assert out.shape == (2, 0, 2, 16)
    assert all(torch.equal(x, y) for x, y in zip(final, state))
    stacked = torch.stack(state)  # the kernel entry itself: no launch, the state copied
    out, final, _, _ = kernels.scan_forward(gates, R, b, stacked, None, False, False)
    assert out.shape == (2, 0, 2, 16) and torch.equal(final, stacked)


@pytest.mark.parametrize("head_dim", [640, 1024])
def test_head_dims_beyond_the_kernel_fall_back_to_fused_with_one_warning(kernels, device, head_dim, caplog):
    gates, R, b, _ = scan_inputs(1, 2, 1, head_dim, device=device)
    with use_backend("triton"):
        assert slstm_op.resolve_backend(gates) == "fused"
    logging.getLogger("transformers").addHandler(caplog.handler)  # transformers' loggers do not propagate
    try:
        with caplog.at_level(logging.WARNING, logger="modeling_slstm"):
            for _ in range(2):
                out, _ = on_triton(gates, R, b)
    finally:
        logging.getLogger("transformers").removeHandler(caplog.handler)
    said = [r for r in caplog.records if f"head dim {head_dim} runs on 'fused'" in r.getMessage()]
    assert len(said) == 1
    torch.testing.assert_close(out, slstm_scan_reference(gates, R, b)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f"head dim {head_dim} exceeds"):  # the kernel entry refuses it
        kernels.scan_forward(gates, R, b, torch.zeros(4, 1, 1, head_dim, device=device), None, False, False)


def test_the_kernel_entries_check_every_tensor(kernels, device):
    B, S, NH, DH = 2, 3, 2, 16
    gates, R, b, _ = scan_inputs(B, S, NH, DH, device=device)
    state = torch.zeros(4, B, NH, DH, device=device)
    good = dict(gates=gates, recurrent_kernel=R, bias=b, state=state, mask=None, exp_forget=False, save=True)
    bad = {
        "recurrent_kernel": R[:, :, :-1],  # wrong shape
        "bias": b.double(),  # wrong dtype
        "state": torch.zeros(4, B, NH, DH, 2, device=device)[..., 0],  # not contiguous
        "mask": torch.ones(B, S, dtype=torch.uint8, device=device),  # not bool
        "gates": gates[..., :5],  # 4 * DH broken
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match="sLSTM"):
            kernels.scan_forward(**{**good, name: value})
    with pytest.raises(ValueError, match="4-D"):
        kernels.scan_forward(**{**good, "gates": gates[0]})
    out, final, saved_g, saved_a = kernels.scan_forward(**good)
    back = dict(recurrent_kernel_t=R.transpose(1, 2).contiguous(), state0=state, mask=None, saved_g=saved_g,
                saved_a=saved_a, d_out=torch.ones_like(out), d_state=torch.zeros_like(final))
    for name, value in {"saved_g": saved_g[:, :-1], "recurrent_kernel_t": R, "d_state": final[:3]}.items():
        with pytest.raises(ValueError, match="sLSTM"):
            kernels.scan_backward(**{**back, name: value})
    with pytest.raises(ValueError, match="sLSTM"):  # a tensor on another device than the gates
        kernels.scan_forward(**{**good, "bias": b.to("meta")})


def test_cpu_tensors_need_the_interpreter(kernels, device, monkeypatch, caplog):
    """Compiled (not interpreted) kernels cannot read CPU tensors: the entry refuses them, a forced "triton" runs
    them on "fused" with a warning."""
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    gates, R, b, _ = scan_inputs(2, 3, 2, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.scan_forward(gates, R, b, torch.zeros(4, 2, 2, 16), None, False, False)
    with use_backend("triton"):
        assert slstm_op.resolve_backend(gates) == "fused"


def test_a_forced_triton_without_triton_raises_and_auto_on_cuda_uses_fused(monkeypatch):
    monkeypatch.setattr(slstm_op, "_triton", False)
    monkeypatch.setattr(slstm_op, "_triton_error", "ModuleNotFoundError: No module named 'triton'")
    gates = torch.zeros(1, 2, 1, 64)
    with use_backend("triton"), pytest.raises(RuntimeError, match="No module named 'triton'"):
        slstm_scan(gates, torch.zeros(1, 16, 64))
    assert slstm_op._resolve("cuda", False, 16) == "fused"  # what auto picks for CUDA tensors without triton


def test_the_triton_kernels_are_the_ops_cuda_implementation(kernels, device):
    for op in ("slstm::scan", "slstm::scan_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    gates = torch.zeros(1, 1, 1, 64, device=device)
    expected = "triton" if device.type == "cuda" else "compiled"
    if device.type == "cpu" and not slstm_op._kernels.compiled_available():
        expected = "fused"
    assert slstm_op.resolve_backend(gates) == expected  # auto: the Triton kernel on CUDA, never the interpreter


def test_importing_the_package_and_running_the_model_on_cpu_does_not_import_the_triton_kernels():
    code = ("import sys, torch, modeling_slstm\n"
            "from modeling_slstm import SLSTMConfig, SLSTMForCausalLM\n"
            "m = SLSTMForCausalLM(SLSTMConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_heads=2))\n"
            "m.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)\n"
            "assert 'modeling_slstm.slstm_triton' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "SLSTM_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sizes", [dict(), dict(hidden_size=160, num_heads=2)], ids=["on_chip", "streamed"])
def test_model_logits_and_grads_match_the_reference_backend(kernels, device, masked, sizes):
    model = random_model(**sizes).to(device)  # 4 heads of 8 (padded to 16 in the kernel), or 2 heads of 80
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    if masked:
        mask[0, :3] = 0  # left padding
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with use_backend(backend):
            logits = model(ids, attention_mask=mask).logits
        logits.square().mean().backward()
        results[backend] = [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    assert_rel_close(results["triton"], results["reference"], 1e-4, "model")


def test_model_generate_matches_the_reference_backend(kernels, device):
    model = random_model().to(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    outputs = {}
    for backend in ("reference", "triton"):
        with use_backend(backend):
            outputs[backend] = model.generate(ids, max_new_tokens=4, do_sample=False, output_scores=True,
                                              return_dict_in_generate=True)
    assert torch.equal(outputs["triton"].sequences, outputs["reference"].sequences)
    assert_rel_close(outputs["triton"].scores, outputs["reference"].scores, 1e-4, "scores")


def test_torch_compile_fullgraph(kernels, device):
    """On CUDA the Triton kernel is one `slstm::scan` node of the graph; on CPU tensors (the interpreter does not
    trace) the reference loop is traced in its place. Either way the compiled model equals the eager one."""
    model = random_model().to(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2)).to(device)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: model(x, use_cache=False).logits, fullgraph=True, backend=record)
    with torch.no_grad(), use_backend("triton"):
        logits = compiled(ids)
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    nodes = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert any("slstm.scan" in target for target in nodes) == (device.type == "cuda")


COMPILE_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from modeling_slstm import slstm_triton as T

FORWARD = ["gates", "R", "bias", "state", "mask", "out", "saved_g", "saved_a"]
BACKWARD = ["RT", "state0", "mask", "saved_g", "saved_a", "d_out", "d_state", "d_gates"]
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for arch, head_dim in json.loads(sys.argv[1]):
    streamed, tiles, options = T.launch_settings(head_dim)
    kernels = [(T._scan_forward_streamed_kernel if streamed else T._scan_forward_kernel, FORWARD,
                dict(HAS_BIAS=True, HAS_MASK=True, EXP_FORGET=False, SAVE=True)),
               (T._scan_backward_streamed_kernel if streamed else T._scan_backward_kernel, BACKWARD,
                dict(HAS_MASK=True))]
    for kernel, pointers, flags in kernels:
        signature = {name: "*i1" if name == "mask" else "*fp32" for name in pointers + ["work"] * streamed}
        signature.update({name: "i32" for name in ("B", "S", "NH")})
        constants = {**tiles, **flags}
        signature.update({name: "constexpr" for name in constants})
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True).stdout
        fields = dict(part.split(":") for part in usage.split("Function", 1)[1].split(":", 1)[1].split()
                      if part.count(":") == 1 and part.split(":")[1].isdigit())
        results.append(dict(arch=arch, head_dim=head_dim, kernel=kernel.__name__, shared=compiled.metadata.shared,
                            registers=int(fields["REG"]), stack=int(fields["STACK"])))
print(json.dumps(results))
"""


def test_every_kernel_compiles_for_real_gpus_within_their_resources():
    """No GPU here, but Triton compiles to a cubin without one: every kernel variant (on-chip heads of 16, 32 and 64
    padded, streamed heads) compiles for sm_80 (A100) and sm_90 (H100) with its launch settings, within 99 KiB of
    shared memory (the smallest limit of those GPUs and sm_86/89) and with at most a little register spill."""
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build has no NVIDIA backend tools")
    cases = [(80, 16), (80, 32), (80, 64), (80, 192), (90, 64), (90, 256)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(cases).replace("(", "[").replace(")", "]")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert len(results) == 2 * len(cases)
    for r in results:
        assert r["shared"] <= 99 * 1024 and r["registers"] <= 255 and r["stack"] <= 64, r


def test_the_environment_variables_alone_run_the_model_on_the_kernels_without_a_gpu():
    """What the README tells someone without a GPU: SLSTM_BACKEND=triton TRITON_INTERPRET=1, nothing else."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    code = ("import sys, torch\n"
            "from modeling_slstm import SLSTMConfig, SLSTMForCausalLM\n"
            "from modeling_slstm.slstm_op import resolve_backend, use_backend\n"
            "torch.manual_seed(0)\n"
            "m = SLSTMForCausalLM(SLSTMConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_heads=2)).eval()\n"
            "ids = torch.randint(0, 32, (2, 5))\n"
            "assert resolve_backend(torch.zeros(1, 1, 2, 64)) == 'triton'\n"
            "logits = m(ids).logits\n"
            "assert 'modeling_slstm.slstm_triton' in sys.modules\n"
            "with use_backend('reference'):\n"
            "    torch.testing.assert_close(logits, m(ids).logits, rtol=1e-5, atol=1e-5)\n")
    env = {**os.environ, "SLSTM_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

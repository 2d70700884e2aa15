"""`sLSTM`, the nn.LSTM-style module: shapes, resume == full (on the test device), dropout between layers, errors."""

import pytest
import torch

from modeling_slstm import sLSTM
from modeling_slstm.slstm_op import use_backend


def test_shapes_like_nn_lstm(device):
    rnn = sLSTM(5, 8, num_layers=3, num_heads=2).to(device)
    outputs, (h, c, n, m) = rnn(torch.randn(7, 4, 5, device=device))
    assert outputs.shape == (7, 4, 8)
    for t in (h, c, n, m):
        assert t.shape == (3, 4, 8)
    torch.testing.assert_close(outputs[-1], h[-1])


def test_batch_first_and_unbatched_agree(device):
    torch.manual_seed(0)
    rnn = sLSTM(5, 8, num_layers=2, num_heads=4).to(device)
    x = torch.randn(6, 3, 5, device=device)
    seq_first, state = rnn(x)
    rnn.batch_first = True
    batch_first, state_bf = rnn(x.transpose(0, 1))
    torch.testing.assert_close(batch_first.transpose(0, 1), seq_first)
    unbatched, state_1 = rnn(x.transpose(0, 1)[1])
    torch.testing.assert_close(unbatched, batch_first[1])
    assert state_1[0].shape == (2, 8)


def test_resume_equals_full(device):
    torch.manual_seed(0)
    rnn = sLSTM(5, 8, num_layers=2, num_heads=2).to(device)
    x = torch.randn(10, 2, 5, device=device)
    full, full_state = rnn(x)
    first, state = rnn(x[:4])
    second, state = rnn(x[4:], state)
    torch.testing.assert_close(torch.cat([first, second]), full)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a, b)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    rnn = sLSTM(4, 6, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 4)
    rnn.eval()
    torch.testing.assert_close(rnn(x)[0], rnn(x)[0])
    rnn.train()
    assert not torch.allclose(rnn(x)[0], rnn(x)[0])
    single = sLSTM(4, 6, num_layers=1, dropout=0.5).train()
    torch.testing.assert_close(single(x)[0], single(x)[0])  # no layer after the last: nothing to drop


def test_gradients_reach_every_parameter():
    rnn = sLSTM(3, 4, num_layers=2, num_heads=2)
    outputs, _ = rnn(torch.randn(5, 2, 3))
    outputs.sum().backward()
    for name, param in rnn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_no_bias():
    rnn = sLSTM(3, 4, bias=False)
    assert rnn.bias_l0 is None
    assert rnn(torch.randn(2, 1, 3))[0].shape == (2, 1, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=4, hidden_size=6, num_heads=4), "divisible"),
        (dict(input_size=0, hidden_size=6), "input_size"),
        (dict(input_size=4, hidden_size=6, dropout=1.5), "dropout"),
        (dict(input_size=4, hidden_size=6, forget_gate="tanh"), "forget_gate"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sLSTM(**kwargs)


def test_bad_inputs():
    rnn = sLSTM(4, 6, num_layers=2)
    with pytest.raises(ValueError, match="input"):
        rnn(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="input"):
        rnn(torch.randn(3))
    bad_state = tuple(torch.zeros(1, 2, 6) for _ in range(4))
    with pytest.raises(ValueError, match="shape"):
        rnn(torch.randn(3, 2, 4), bad_state)
    with pytest.raises(ValueError, match=r"\(h, c, n, m\)"):
        rnn(torch.randn(3, 2, 4), torch.zeros(2, 2, 6))


def test_dropout_with_one_layer_warns_as_nn_lstm(caplog):
    with caplog.at_level("WARNING"):
        sLSTM(4, 8, num_layers=1, dropout=0.375)  # a value no other test uses: the warning is logged once per message
    assert "dropout=0.375 has no effect with num_layers=1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        sLSTM(4, 8, num_layers=2, dropout=0.5)
        sLSTM(4, 8, num_layers=1)
    assert "dropout" not in caplog.text


@pytest.mark.parametrize("backend", ["reference", "fused", "compiled"])
def test_empty_sequence(backend):
    rnn = sLSTM(4, 8, num_layers=2, num_heads=2)
    _, state = rnn(torch.randn(3, 2, 4))
    with use_backend(backend):
        out, same = rnn(torch.randn(0, 2, 4), state)
    assert out.shape == (0, 2, 8)
    for before, after in zip(state, same):
        torch.testing.assert_close(after, before)

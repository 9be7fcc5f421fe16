"""slimops.ops.load_watch: the CPU ops run on one thread while the machine is contended
(csrc/cpu/parallel.h, rule 5), and serial_while_contended takes a whole block there.

The suite runs with the watch off (conftest.py: bitwise-repeatable results whatever the
load); these tests set the policy they check and put it back."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import slimops
from slimops import ops
from slimops.nn import SlimConvBNAct
from slimops.train import slimmable_step

pytestmark = pytest.mark.skipif(ops.backend_info()["cpu"] != "C++",
                                reason="the load watch is the C++ ops'")


@pytest.fixture
def policy():
    """``policy(name)`` sets the load policy for the test; the suite's comes back after."""
    before = ops.load_watch()["policy"]
    yield ops.set_load_policy
    ops.set_load_policy(before)


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_policy_round_trip(policy):
    assert ops.load_watch()["policy"] == "off"  # the suite's (conftest.py)
    assert policy("serial") == "off"
    state = ops.load_watch()
    assert state["policy"] == "serial" and state["contended"] is True
    assert ops.machine_contended()
    assert slimops.backend_info()["load_policy"] == "serial"
    assert policy("adaptive") == "serial"
    assert set(state) == {"policy", "contended", "joins", "slow_joins", "serial_ops",
                          "slow_join_us", "samples", "busy_samples"}
    assert state["slow_join_us"] == 1000


def test_bad_policy_is_an_error(policy):
    with pytest.raises(ValueError, match="load policy must be one of"):
        ops.set_load_policy("sometimes")
    with pytest.raises(ValueError, match="slow_join_us must be"):
        ops.set_load_policy("adaptive", -5)
    with pytest.raises(RuntimeError, match="policy must be -1"):
        torch.ops.slimops.load_watch(3)
    with pytest.raises(RuntimeError, match="slow_join_us must be"):
        torch.ops.slimops.load_watch(-1, 1 << 41)
    assert ops.load_watch()["policy"] == "off"


def _conv_case():
    torch.manual_seed(0)
    x = torch.randn(4, 24, 30, 30, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 32, 3, 3, dtype=torch.float64, requires_grad=True)
    scale, shift = torch.rand(36, dtype=torch.float64) + 0.5, torch.randn(36, dtype=torch.float64)
    return x, weight, scale, shift


def _run_conv(x, weight, scale, shift):
    out = ops.conv2d(x, weight, None, 36, 1, 1, 1, 1, scale, shift, None, "relu")
    gx, gw = torch.autograd.grad(out, (x, weight), torch.ones_like(out))
    return out.detach(), gx, gw


def test_serial_op_is_the_one_thread_op(policy, two_threads):
    """Policy serial: each op runs as under torch.set_num_threads(1) (bitwise), is counted,
    and the caller's thread count is the same after it."""
    case = _conv_case()
    torch.set_num_threads(1)
    expected = _run_conv(*case)
    torch.set_num_threads(2)
    policy("serial")
    before = ops.load_watch()["serial_ops"]
    got = _run_conv(*case)
    assert ops.load_watch()["serial_ops"] >= before + 2  # forward and backward at least
    assert torch.get_num_threads() == 2
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_serial_ops_match_the_reference(policy, two_threads):
    """Every op family under policy serial against slimops.reference (depthwise, BN, linear
    with their backward; the conv above)."""
    policy("serial")
    torch.manual_seed(1)
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64, requires_grad=True)
    dw = torch.randn(24, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(30, 20, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(16, dtype=torch.float64) + 0.5
    beta = torch.randn(16, dtype=torch.float64)
    for impl in (ops, slimops.reference):
        y = impl.depthwise_conv2d(x, dw, None, 1, 1, 1, None, None, None, "relu")
        rm, rv = torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64)
        z = impl.batch_norm_act(y, gamma, beta, rm, rv, True, 0.1, 1e-5, None, "relu6")
        lin = impl.linear(v, lw, None, 25)
        outs = (z, lin, *torch.autograd.grad(z.sum() + lin.sum(), (x, dw, v, lw)), rm, rv)
        if impl is ops:
            got = outs
    for g, e in zip(got, outs):
        torch.testing.assert_close(g, e)


def test_thread_count_comes_back_after_an_error(policy, two_threads):
    policy("serial")
    x = torch.randn(1, 5, 8, 8)
    with pytest.raises(RuntimeError):
        torch.ops.slimops.conv2d(x, torch.randn(8, 4, 3, 3), None, 8, [1, 1], [1, 1], [1, 1],
                                 1, None, None, None, 0)
    assert torch.get_num_threads() == 2


def test_off_never_serial(policy, two_threads):
    policy("off")
    before = ops.load_watch()["serial_ops"]
    _run_conv(*_conv_case())
    assert ops.load_watch()["serial_ops"] == before
    assert not ops.machine_contended()


@pytest.mark.parametrize("name", ["serial", "off"])
def test_serial_while_contended(policy, two_threads, name):
    policy(name)
    with slimops.serial_while_contended() as serial:
        inside = torch.get_num_threads()
    assert serial == (name == "serial")
    assert inside == (1 if name == "serial" else 2)
    assert torch.get_num_threads() == 2


def test_serial_while_contended_restores_on_error(policy, two_threads):
    policy("serial")
    with pytest.raises(KeyError):
        with slimops.serial_while_contended():
            raise KeyError("inside")
    assert torch.get_num_threads() == 2


def test_serial_while_contended_one_thread_is_a_no_op(policy):
    policy("serial")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with slimops.serial_while_contended() as serial:
            assert torch.get_num_threads() == 1
        assert serial is False
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["serial", "off"])
def test_slimmable_step_runs_the_whole_step_serial(policy, two_threads, name):
    """The training step (forward, loss, backward, optimizer) runs on one thread while the
    machine is contended: the loss function sees the thread count."""
    policy(name)
    torch.manual_seed(0)
    model = nn.Sequential(SlimConvBNAct([4, 4], [4, 8], 3, widths=(0.5, 1.0)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    seen = []

    def loss_fn(out, target):
        seen.append(torch.get_num_threads())
        return nn.functional.cross_entropy(out, target)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    slimmable_step(model, torch.randn(4, 4, 6, 6), torch.tensor([0, 1, 2, 3]), loss_fn, opt)
    assert seen == [1 if name == "serial" else 2] * 2
    assert torch.get_num_threads() == 2


_CHILD = textwrap.dedent("""
    import sys, time, torch, slimops
    from slimops import ops
    ops.set_load_policy(sys.argv[1], int(sys.argv[2]))
    torch.set_num_threads(2)
    x = torch.randn(1, 8, 6, 6)
    end = time.monotonic() + float(sys.argv[3])
    calls = 0
    while calls < 3 or time.monotonic() < end:
        ops.depthwise_conv2d(x, torch.randn(8, 1, 3, 3), None, 1, 1, 1, None, None, None, None)
        calls += 1
    s = ops.load_watch()
    print(s["joins"], s["slow_joins"], int(s["contended"]), s["serial_ops"], s["slow_join_us"],
          s["busy_samples"])
""")


def _child(policy: str, slow_join_us: int, seconds: float = 0.0):
    """A fresh process (no join timed yet) with 2 threads running small depthwise convs
    (one-thread work: no region of their own; three, or as many as ``seconds`` takes) under
    the policy: [joins, slow_joins, contended, serial_ops, slow_join_us, busy_samples]."""
    out = subprocess.run([sys.executable, "-c", _CHILD, policy, str(slow_join_us),
                          str(seconds)], check=True, capture_output=True, text=True,
                         timeout=300).stdout
    return [int(v) for v in out.split()]


def test_slow_joins_turn_the_ops_serial():
    """Every join counts as slow (threshold 0): the first op's probe region is one slow join,
    the probe 100 ms later the second, within 250 ms of the first: the machine is contended,
    and the ops after it run serial (ops that open no region: the probes are the joins)."""
    joins, slow, contended, serial, threshold, _ = _child("adaptive", 0, seconds=0.35)
    assert joins >= 2 and slow == joins
    assert contended == 1 and serial >= 1 and threshold == 0


def test_one_slow_join_is_not_load():
    """A lone slow join (a hypervisor pausing a virtual CPU for a millisecond does that on an
    idle machine) leaves the ops on their team: three quick ops, one probe, counted slow."""
    joins, slow, contended, serial, _, busy = _child("adaptive", 0)
    if busy:  # the CPU-time windows saw this machine loaded: their own signal, not a join's
        pytest.skip("the machine was loaded during the child's run")
    if joins > 1:  # the child took over 100 ms between ops (a descheduled process)
        pytest.skip("the child ran slowly enough to probe twice")
    assert (joins, slow, contended, serial) == (1, 1, 0, 0)


def test_fast_joins_are_not_slow():
    """No join counts as slow: the probes (one per 100 ms) find none. (Whether the ops ran
    serial depends on the machine's load here, which the CPU-time windows may see.)"""
    joins, slow, _, _, threshold, _ = _child("adaptive", 10 ** 9)
    assert joins >= 1 and slow == 0 and threshold == 10 ** 9


def test_off_does_not_probe():
    assert _child("off", 0)[:5] == [0, 0, 0, 0, 0]


_SAMPLED_CHILD = textwrap.dedent("""
    import os, sys, time, torch, slimops
    from slimops import ops
    if sys.argv[1] == "one-cpu":
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    ops.set_load_policy("adaptive", 10 ** 9)  # no join counts as slow: the samples decide
    torch.set_num_threads(2)
    x, w = torch.randn(1, 8, 6, 6), torch.randn(8, 1, 3, 3)
    end = time.monotonic() + 0.7  # three 200 ms windows at least
    while time.monotonic() < end:
        ops.depthwise_conv2d(x, w, None, 1, 1, 1, None, None, None, None)
    s = ops.load_watch()
    print(s["samples"], s["busy_samples"], int(s["contended"]), s["serial_ops"], s["slow_joins"])
""")


def _sampled_child(setting: str):
    out = subprocess.run([sys.executable, "-c", _SAMPLED_CHILD, setting], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return [int(v) for v in out.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat: Linux")
def test_a_team_larger_than_its_cpus_is_contended():
    """Two threads allowed one CPU: whatever else runs, the CPU left is less than the team
    needs, so the CPU-time windows mark the machine contended and the ops run serial (the
    joins, counted slow only past 10^9 us, play no part)."""
    samples, busy, contended, serial, slow = _sampled_child("one-cpu")
    assert samples >= 1 and busy == samples
    assert contended == 1 and serial >= 1 and slow == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) != 2,
                    reason="/proc/stat: Linux; the threshold's arithmetic for 2 CPUs")
def test_another_process_on_a_core_is_seen():
    """Another process spinning on one of two CPUs: the windows see it (about one core left
    for a team of two)."""
    spinner = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        samples, busy, contended, serial, _ = _sampled_child("all-cpus")
    finally:
        spinner.kill()
        spinner.wait()
    assert samples >= 1 and busy >= 1
    assert contended == 1 and serial >= 1


def test_serial_exit_checks_its_arguments():
    lw = importlib.import_module("slimops.ops.load_watch")  # the package exports its function

    with pytest.raises(ValueError, match="what serial_enter returned"):
        lw._SERIAL_EXIT(0, 0)
    with pytest.raises(TypeError):
        lw._SERIAL_ENTER(1)


def test_blocks_nest(policy, two_threads):
    """An inner block inside a serial one changes nothing; the outer one restores."""
    policy("serial")
    with slimops.serial_while_contended() as outer:
        with slimops.serial_while_contended() as inner:
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert (outer, inner) == (True, False)
    assert torch.get_num_threads() == 2

"""slimops.width: channel rules, width validation, default and scoped widths (per thread and
per asyncio task)."""

from __future__ import annotations

import collections
import importlib
import math
import threading

import pytest
import torch

import slimops
from slimops.nn import SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm2d
from slimops.width import Slimmable, channels, make_divisible, normalize_widths, slimmable_layers

WIDTHS = (0.25, 0.5, 1.0)


def small_model(widths=WIDTHS):
    return torch.nn.Sequential(
        SlimmableConv2d(3, channels(8, widths), 3, padding=1, widths=widths),
        SwitchableBatchNorm2d(channels(8, widths), widths=widths),
        torch.nn.ReLU(),
    )


# --------------------------------------------------------------------------- make_divisible


@pytest.mark.parametrize(
    "value, divisor, expected",
    [
        (32 * 0.35, 8, 16),  # nearest multiple is 8, but 8 < 0.9 * 11.2: bumped to 16
        (32 * 0.5, 8, 16),
        (32 * 0.25, 8, 8),
        (3, 8, 8),  # never below the divisor
        (0.5, 8, 8),
        (12, 8, 16),  # exact half rounds up
        (11.9, 8, 8 + 8),  # nearest is 8 (< 0.9 * 11.9 = 10.71): 16
        (36, 8, 40),
        (35.9, 8, 40),  # nearest is 32 < 0.9 * 35.9 = 32.31: bumped
        (35.5, 8, 32),  # nearest is 32 >= 0.9 * 35.5 = 31.95: kept
        (100, 8, 104),
        (96 * 0.75, 8, 72),
        (20, 16, 32),  # nearest is 16 < 18
        (24, 16, 32),
        (23, 16, 32),  # nearest is 16 < 20.7
        (17, 16, 16),
        (1280 * 1.0, 8, 1280),
    ],
)
def test_make_divisible_table(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


def test_make_divisible_min_value():
    assert make_divisible(5, 8, min_value=16) == 16
    assert make_divisible(40, 8, min_value=16) == 40
    assert make_divisible(1, 8, min_value=1) == 1  # min_value wins over the divisor


@pytest.mark.parametrize("divisor", [1, 4, 8, 16])
def test_make_divisible_rule(divisor):
    """The rule itself, over a grid: a multiple of the divisor, at least the divisor, never
    below 90% of the value, and the nearest such multiple unless that one loses > 10%."""
    for i in range(1, 800):
        value = i * 0.37
        if abs((value / divisor) % 1.0 - 0.5) < 1e-6:
            continue  # an exact tie: left to the table above
        r = make_divisible(value, divisor)
        assert isinstance(r, int)
        assert r % divisor == 0, (value, r)
        assert r >= divisor, (value, r)
        assert r >= 0.9 * value, (value, r)
        nearest = max(divisor, math.floor(value / divisor + 0.5) * divisor)
        if nearest >= 0.9 * value:
            assert r == nearest, (value, r, nearest)
        else:
            assert r == nearest + divisor, (value, r, nearest)


# --------------------------------------------------------------------------------- channels


def test_channels_truncates():
    assert channels(32, WIDTHS) == [8, 16, 32]
    assert channels(10, (0.35, 1.0)) == [3, 10]  # int(3.5)
    assert channels(13, (0.25, 0.5, 0.75, 1.0)) == [3, 6, 9, 13]


def test_channels_never_zero():
    assert channels(3, (0.25, 1.0)) == [1, 3]
    assert channels(1, (0.1, 0.5, 1.0)) == [1, 1, 1]


def test_channels_divisor():
    assert channels(32, (0.35, 1.0), divisor=8) == [16, 32]
    assert channels(32, WIDTHS, divisor=8) == [8, 16, 32]
    assert channels(1280, (0.5, 1.0), divisor=8) == [640, 1280]
    for c in (3, 7, 13, 24, 96):
        for w, got in zip(WIDTHS, channels(c, WIDTHS, divisor=8)):
            assert got == make_divisible(c * w, 8)


def test_channels_follow_sorted_widths():
    # Per-width lists are in the order of ascending widths, however the widths were given.
    assert channels(32, (1.0, 0.25, 0.5)) == [8, 16, 32]


def test_channels_validates_widths():
    with pytest.raises(ValueError):
        channels(32, ())
    with pytest.raises(ValueError):
        channels(32, (0.5, 0.5))


# ------------------------------------------------------------------------- normalize_widths


def test_normalize_widths_sorts_and_floats():
    ws = normalize_widths([1, 0.25, 0.5])
    assert ws == (0.25, 0.5, 1.0)
    assert all(isinstance(w, float) for w in ws)
    assert normalize_widths((0.5,)) == (0.5,)


@pytest.mark.parametrize(
    "bad", [(), [], (0.5, 0.5), (0.0, 1.0), (-0.5, 1.0), (1.0, 1), (float("nan"), 1.0),
            (float("inf"),)]
)
def test_normalize_widths_value_errors(bad):
    with pytest.raises(ValueError, match="distinct positive"):
        normalize_widths(bad)


@pytest.mark.parametrize("bad", [(None, 1.0), 0.5, ([0.5], 1.0), "0.5", ("0.5", 1.0), (True,)])
def test_normalize_widths_type_errors(bad):
    with pytest.raises(TypeError, match="sequence of numbers"):
        normalize_widths(bad)


# ---------------------------------------------------------- set_width / get_width / widths


def test_default_width_is_the_largest():
    model = small_model()
    assert slimops.get_width(model) == 1.0
    assert slimops.model_widths(model) == WIDTHS


def test_set_get_width():
    model = small_model()
    x = torch.randn(2, 3, 5, 5)
    assert slimops.set_width(model, 0.25) is model
    assert slimops.get_width(model) == 0.25
    assert model(x).shape == (2, 2, 5, 5)
    slimops.set_width(model, 0.5)
    assert slimops.get_width(model) == 0.5
    assert model(x).shape == (2, 4, 5, 5)
    # every slimmable layer follows
    assert all(layer.active_width() == 0.5 for layer in (model[0], model[1]))
    slimops.set_width(model, 1)  # an int is a number too
    assert slimops.get_width(model) == 1.0
    assert model(x).shape == (2, 8, 5, 5)


def test_set_width_on_a_single_layer():
    layer = SlimmableLinear([2, 4], [3, 5], widths=(0.5, 1.0))
    slimops.set_width(layer, 0.5)
    assert slimops.get_width(layer) == 0.5
    assert layer(torch.randn(3, 2)).shape == (3, 3)


def test_model_widths_is_the_intersection():
    model = torch.nn.Sequential(
        SlimmableLinear([2, 3, 4], [2, 3, 4], widths=(0.25, 0.5, 1.0)),
        SlimmableLinear([3, 4, 5], [3, 4, 5], widths=(0.5, 0.75, 1.0)),
    )
    assert slimops.model_widths(model) == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"\(0\.5, 1\.0\)"):
        slimops.set_width(model, 0.25)


def test_no_slimmable_layers():
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    for fn in (slimops.get_width, slimops.model_widths):
        with pytest.raises(ValueError, match="no slimmable layers"):
            fn(plain)
    with pytest.raises(ValueError, match="no slimmable layers"):
        slimops.set_width(plain, 1.0)
    with pytest.raises(ValueError, match="no slimmable layers"):
        with slimops.width(plain, 1.0):
            pass


def test_get_width_detects_disagreeing_layers():
    model = small_model()
    slimops.set_width(model[0], 0.25)
    with pytest.raises(RuntimeError, match="different widths"):
        slimops.get_width(model)


@pytest.mark.parametrize("bad", [0.3, 0.75, 2.0, 0, -1])
def test_unknown_width_lists_the_widths(bad):
    model = small_model()
    slimops.set_width(model, 0.5)
    with pytest.raises(ValueError) as info:
        slimops.set_width(model, bad)
    msg = str(info.value)
    assert "(0.25, 0.5, 1.0)" in msg and repr(bad) in msg
    with pytest.raises(ValueError, match=r"\(0\.25, 0\.5, 1\.0\)"):
        with slimops.width(model, bad):
            pass
    # nothing changed, not even partially
    assert slimops.get_width(model) == 0.5


def test_unknown_width_on_a_layer_names_its_widths():
    layer = SlimmableConv2d([1, 2], [1, 2], 1, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"unknown width 0\.3.*\(0\.5, 1\.0\)"):
        layer.canonical_width(0.3)


@pytest.mark.parametrize("bad", ["0.5", None, True, False, [0.5], torch.tensor(0.5)])
def test_non_number_width_is_a_type_error(bad):
    model = small_model()
    with pytest.raises(TypeError, match="a width is a number"):
        slimops.set_width(model, bad)
    with pytest.raises(TypeError, match="a width is a number"):
        with slimops.width(model, bad):
            pass
    assert slimops.get_width(model) == 1.0


def test_float_round_off_is_tolerated():
    widths = (0.3, 0.6, 1.0)
    model = small_model(widths)
    x = torch.randn(1, 3, 4, 4)
    w = 0.1 + 0.2
    assert w != 0.3
    slimops.set_width(model, w)
    assert slimops.get_width(model) == 0.3  # canonical, exactly one of the widths
    y = model(x)
    slimops.set_width(model, 0.3)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    slimops.set_width(model, 1.0)
    with slimops.width(model, 0.2 * 3):  # 0.6000000000000001
        assert slimops.get_width(model) == 0.6
        assert model(x).shape[1] == channels(8, widths)[1]
    assert slimops.get_width(model) == 1.0


# --------------------------------------------------------------------------- scoped width


def test_scope_restores_previous_width():
    model = small_model()
    slimops.set_width(model, 0.5)
    x = torch.randn(1, 3, 4, 4)
    with slimops.width(model, 0.25) as m:
        assert m is model
        assert slimops.get_width(model) == 0.25
        assert model(x).shape[1] == 2
    assert slimops.get_width(model) == 0.5
    assert model(x).shape[1] == 4


def test_scope_restores_on_exception():
    model = small_model()
    with pytest.raises(KeyError):
        with slimops.width(model, 0.25):
            assert slimops.get_width(model) == 0.25
            raise KeyError("boom")
    assert slimops.get_width(model) == 1.0


def test_scopes_nest():
    model = small_model()
    slimops.set_width(model, 0.5)
    with slimops.width(model, 0.25):
        assert slimops.get_width(model) == 0.25
        with slimops.width(model, 1.0):
            assert slimops.get_width(model) == 1.0
            with pytest.raises(RuntimeError):
                with slimops.width(model, 0.5):
                    assert slimops.get_width(model) == 0.5
                    raise RuntimeError
            assert slimops.get_width(model) == 1.0
        assert slimops.get_width(model) == 0.25
    assert slimops.get_width(model) == 0.5


def test_scopes_of_two_models_are_independent():
    a, b = small_model(), small_model()
    with slimops.width(a, 0.25):
        assert slimops.get_width(b) == 1.0
        with slimops.width(b, 0.5):
            assert slimops.get_width(a) == 0.25
            assert slimops.get_width(b) == 0.5
        assert slimops.get_width(b) == 1.0
    assert slimops.get_width(a) == 1.0


def test_set_width_inside_a_scope_changes_the_default_only():
    model = small_model()
    with slimops.width(model, 0.25):
        slimops.set_width(model, 0.5)
        assert slimops.get_width(model) == 0.25  # the scope wins in this thread
    assert slimops.get_width(model) == 0.5


def test_scope_on_a_submodule():
    model = small_model()
    with slimops.width(model[0], 0.25):
        assert model[0].active_width() == 0.25
        assert model[1].active_width() == 1.0
    assert slimops.get_width(model) == 1.0


# -------------------------------------------------------------------------------- threads


def _run_threads(fns, barrier=None, timeout=60.0):
    """Run each of ``fns`` in its own thread; re-raise the first real failure. A failing
    thread breaks ``barrier`` so the others stop waiting for it."""
    errors = []

    def wrap(fn):
        def target():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                if barrier is not None:
                    barrier.abort()
        return target

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if errors:
        raise errors[0]


def test_threads_share_one_model_at_different_widths(make_cnn):
    model = make_cnn().eval()
    x = torch.randn(2, 3, 9, 9)
    expected = {}
    with torch.no_grad():
        for w in WIDTHS:
            slimops.set_width(model, w)
            expected[w] = model(x)
    # the widths really differ
    assert not torch.allclose(expected[0.25], expected[1.0])
    slimops.set_width(model, 1.0)

    n_threads, iters = 4, 20
    barrier = threading.Barrier(n_threads, timeout=30)
    results = {i: [] for i in range(n_threads)}
    thread_widths = [WIDTHS[i % len(WIDTHS)] for i in range(n_threads)]
    thread_widths[-1] = 0.25  # two threads at the smallest width, one each at the others

    def worker(i):
        def fn():
            w = thread_widths[i]
            with torch.no_grad():
                for _ in range(iters):
                    barrier.wait()
                    with slimops.width(model, w):
                        assert slimops.get_width(model) == w
                        y = model(x)
                        assert slimops.get_width(model) == w
                    results[i].append(y)
        return fn

    _run_threads([worker(i) for i in range(n_threads)], barrier)
    for i, w in enumerate(thread_widths):
        assert len(results[i]) == iters
        for y in results[i]:
            torch.testing.assert_close(y, expected[w], rtol=1e-6, atol=1e-6)
    # the main thread was never affected
    assert slimops.get_width(model) == 1.0


def test_set_width_in_main_thread_does_not_disturb_a_scoped_thread(make_cnn):
    model = make_cnn().eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = {}
        for w in WIDTHS:
            slimops.set_width(model, w)
            expected[w] = model(x)
    slimops.set_width(model, 1.0)

    entered, changed = threading.Event(), threading.Event()
    seen = {}

    def scoped():
        with slimops.width(model, 0.5):
            entered.set()
            assert changed.wait(30)
            seen["scoped_width"] = slimops.get_width(model)
            with torch.no_grad():
                seen["scoped_out"] = model(x)
        seen["after_width"] = slimops.get_width(model)  # the new default, seen by all threads

    def plain():
        assert changed.wait(30)
        seen["plain_width"] = slimops.get_width(model)

    t1, t2 = threading.Thread(target=scoped), threading.Thread(target=plain)
    t1.start()
    t2.start()
    assert entered.wait(30)
    slimops.set_width(model, 0.25)
    changed.set()
    t1.join(30)
    t2.join(30)
    assert not t1.is_alive() and not t2.is_alive()
    assert seen["scoped_width"] == 0.5
    torch.testing.assert_close(seen["scoped_out"], expected[0.5], rtol=1e-6, atol=1e-6)
    assert seen["after_width"] == 0.25
    assert seen["plain_width"] == 0.25
    assert slimops.get_width(model) == 0.25
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected[0.25], rtol=1e-6, atol=1e-6)


def test_scope_is_invisible_to_other_threads():
    model = small_model()
    seen = []
    with slimops.width(model, 0.25):
        t = threading.Thread(target=lambda: seen.append(slimops.get_width(model)))
        t.start()
        t.join(30)
    assert seen == [1.0]


# ----------------------------------------------------------- channel rules and any width


@pytest.mark.parametrize("divisor", [None, 8])
def test_channel_rule_is_the_channels_rounding(divisor):
    from slimops.width import ChannelRule

    ws = (0.25, 0.35, 0.5, 0.75, 1.0, 1.3)
    rule = ChannelRule(96, divisor)
    assert rule.at(ws) == channels(96, ws, divisor)
    assert (rule * 6).at(ws) == [6 * c for c in channels(96, ws, divisor)]
    assert (rule // 4).at(ws) == [max(1, c // 4) for c in channels(96, ws, divisor)]
    assert ChannelRule(3, fixed=True).at(ws) == [3] * len(ws)
    assert ChannelRule(7, 8, min_value=1)(0.1) == make_divisible(0.7, 8, 1)
    assert rule * 2 == ChannelRule(96, divisor, multiplier=2) and rule * 2 != rule


@pytest.mark.parametrize("bad", [dict(c=0), dict(c=2.5), dict(c=8, divisor=0),
                                 dict(c=8, multiplier=True), dict(c=8, per=0)])
def test_channel_rule_errors(bad):
    from slimops.width import ChannelRule

    with pytest.raises(ValueError, match="ChannelRule"):
        ChannelRule(**bad)


def rule_model(widths=WIDTHS):
    from slimops.width import ChannelRule

    return torch.nn.Sequential(
        SlimmableConv2d(3, ChannelRule(8), 3, padding=1, widths=widths),
        SwitchableBatchNorm2d(ChannelRule(8), widths=widths),
    )


def test_layers_built_from_rules_run_at_any_width_in_between():
    from slimops.width import width_range

    model = rule_model()
    assert width_range(model) == (0.25, 1.0)
    assert width_range(small_model()) is None  # per-width lists: listed widths only
    slimops.set_width(model, 0.6)
    assert slimops.get_width(model) == 0.6 and slimops.model_widths(model) == WIDTHS
    assert model[0].active_channels() == (3, 4) and model[0].width_index() is None
    with slimops.width(model, 0.6000000001):  # rounded to one width
        assert slimops.get_width(model) == 0.6
    for w in (0.2, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"or any width between 0\.25 and 1\.0"):
            slimops.set_width(model, w)
    with pytest.raises(ValueError, match=r"unknown width 0\.6.*\(0\.25, 0\.5, 1\.0\)$"):
        slimops.set_width(small_model(), 0.6)


def test_a_layer_with_a_list_pins_the_model_to_its_listed_widths():
    from slimops.width import ChannelRule, width_range

    model = torch.nn.Sequential(
        SlimmableConv2d(3, ChannelRule(8), 3, padding=1, widths=WIDTHS),
        SlimmableConv2d(channels(8, WIDTHS), 4, 1, widths=WIDTHS),
    )
    assert model[0].any_width and not model[1].any_width
    assert width_range(model) is None
    with pytest.raises(ValueError, match="unknown width 0.6"):
        slimops.set_width(model, 0.6)
    assert slimops.get_width(model) == 1.0  # nothing changed on the error


# ------------------------------------------------------------------- asyncio and generators


def test_asyncio_tasks_keep_their_own_width_across_await():
    """Three tasks of one event loop enter different widths and interleave at every await:
    each sees only its own width, and the model's width afterwards is its default (with a
    thread-local, the tasks overwrote each other's and one width stayed behind)."""
    import asyncio

    model = small_model()
    slimops.set_width(model, 1.0)
    seen = {}

    async def serve(w):
        with slimops.width(model, w):
            for step in range(5):
                await asyncio.sleep(0)  # let the other tasks run inside their blocks
                seen.setdefault(w, set()).add(slimops.get_width(model))
        return slimops.get_width(model)

    async def main():
        return await asyncio.gather(*(serve(w) for w in (0.25, 0.5, 1.0)))

    after = asyncio.run(main())
    assert seen == {0.25: {0.25}, 0.5: {0.5}, 1.0: {1.0}}
    assert after == [1.0, 1.0, 1.0]
    assert slimops.get_width(model) == 1.0


def test_asyncio_task_keeps_the_width_it_was_created_in():
    import asyncio

    model = small_model()

    async def main():
        with slimops.width(model, 0.25):
            inner = asyncio.create_task(_width_later(model))
        # the task copied the context at creation: it keeps 0.25 after the block ended here
        return await inner, slimops.get_width(model)

    inside, outside = asyncio.run(main())
    assert inside == 0.25 and outside == 1.0


async def _width_later(model):
    import asyncio

    await asyncio.sleep(0)
    return slimops.get_width(model)


def test_generator_scope_is_restored_when_it_finishes_or_is_closed():
    model = small_model()

    def widths_of(w):
        with slimops.width(model, w):
            yield slimops.get_width(model)
            yield slimops.get_width(model)

    gen = widths_of(0.25)
    assert next(gen) == 0.25
    # Python's rule: a suspended generator shares its caller's context, so the caller sees
    # the scope until the generator leaves its block.
    assert slimops.get_width(model) == 0.25
    gen.close()
    assert slimops.get_width(model) == 1.0
    assert list(widths_of(0.5)) == [0.5, 0.5]
    assert slimops.get_width(model) == 1.0


def test_generator_closed_in_another_context_does_not_raise():
    import contextvars

    model = small_model()

    def scoped():
        with slimops.width(model, 0.5):
            yield

    gen = scoped()
    next(gen)
    # Closed from a copy of the context, its token belongs to another context: leaving the
    # block must not raise (ContextVar.reset would, with ValueError).
    contextvars.copy_context().run(gen.close)
    gen = scoped()
    next(gen)
    contextvars.copy_context().run(gen.close)


def test_a_block_left_in_another_context_does_not_leak_its_width_to_a_new_layer():
    # The leftover entry of a block closed elsewhere (Python's contextvar rule keeps it in
    # this context) must not apply to a new layer that CPython allocates at a dead layer's
    # address (seen in CI: a fresh model ran at a previous test's scoped width). The entry
    # holds its layer, so that address cannot be reused while the entry exists.
    import contextvars
    import gc
    import weakref

    def body():
        model = small_model()
        conv = weakref.ref(model[0])

        def scoped(m):
            with slimops.width(m, 0.5):
                yield

        gen = scoped(model)
        next(gen)
        contextvars.copy_context().run(gen.close)
        del model, gen
        gc.collect()
        assert conv() is not None, "a leftover entry must keep its layer (and its id) alive"
        for _ in range(50):
            fresh = small_model()
            assert {layer.active_width() for layer in slimmable_layers(fresh)} == {1.0}
        return conv

    # In a copy of this context, so the leftover entry does not outlive the test; once that
    # context is gone the layer is freed (the entry is not a leak beyond its context).
    conv = contextvars.copy_context().run(body)
    gc.collect()
    assert conv() is None


@pytest.mark.parametrize("make", ["np.float32", "np.float64", "torch scalar item", "Fraction"])
def test_numpy_and_other_real_widths_are_accepted(make):
    import fractions

    import numpy as np

    model = small_model((0.35, 0.5, 1.0))
    value = {"np.float32": lambda: np.float32(0.35), "np.float64": lambda: np.float64(0.35),
             "torch scalar item": lambda: torch.tensor(0.35).item(),
             "Fraction": lambda: fractions.Fraction(7, 20)}[make]()
    slimops.set_width(model, value)
    assert slimops.get_width(model) == 0.35
    with slimops.width(model, np.float32(0.5)):
        assert slimops.get_width(model) == 0.5


@pytest.fixture(params=["compiled", "python"])
def walk(request, monkeypatch):
    """``slimmable_layers`` as it runs (its compiled walk with the extension) and its Python
    loop, which defines it (and runs where the compiled walk declines)."""
    width_state = importlib.import_module("slimops.width")
    if request.param == "compiled" and width_state._COMPILED_WALK is None:
        pytest.skip("needs the compiled extension")
    if request.param == "python":
        monkeypatch.setattr(width_state, "_COMPILED_WALK", None)
    return request.param


def test_compiled_walk_is_used_with_the_extension():
    width_state = importlib.import_module("slimops.width")
    assert (width_state._COMPILED_WALK is not None) == (slimops.backend_info()["cpu"] == "C++")


@pytest.mark.parametrize("name", sorted(slimops.models.MODELS))
def test_slimmable_layers_is_modules_order(name, walk):
    """The stack walk visits what ``model.modules()`` visits, in its order."""
    model = slimops.models.MODELS[name]()
    expected = [m for m in model.modules() if isinstance(m, Slimmable)]
    got = slimmable_layers(model)
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def test_slimmable_layers_shared_and_empty_children(walk):
    """A module registered twice is listed once (its first place), an empty child slot
    (``None``) is skipped, and the model itself counts when it is slimmable."""
    shared = SlimmableLinear([4, 8], [4, 8], widths=(0.5, 1.0))
    other = SlimmableLinear([4, 8], [4, 8], widths=(0.5, 1.0))
    inner = torch.nn.Sequential(other, shared)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), inner, shared)
    model.add_module("empty", None)
    got = slimmable_layers(model)
    assert [id(m) for m in got] == [id(shared), id(other)]
    assert [id(m) for m in got] == [id(m) for m in model.modules()
                                    if isinstance(m, Slimmable)]
    assert slimmable_layers(shared) == [shared]


@pytest.mark.parametrize("look_inside", [True, False])
def test_slimmable_layers_skips_inside_layers_that_say_so(look_inside, walk):
    """A slimmable layer with ``walk_submodules = False`` (``SwitchableBatchNorm2d``: its
    submodules are its own per-width BNs) is listed but not looked inside."""

    class Holder(SwitchableBatchNorm2d):
        walk_submodules = look_inside

    holder = Holder([4, 8], widths=(0.5, 1.0))
    inner = SlimmableLinear([4, 8], [4, 8], widths=(0.5, 1.0))
    holder.extra = inner
    model = torch.nn.Sequential(torch.nn.ReLU(), holder)
    got = slimmable_layers(model)
    assert got == ([holder, inner] if look_inside else [holder])
    assert SwitchableBatchNorm2d.walk_submodules is False
    assert all(m.walk_submodules for m in (inner, SlimmableConv2d(4, 4, 1)))


def test_slimmable_layers_of_a_module_with_its_own_children_dict(walk):
    """A ``_modules`` that is not a plain dict (here an OrderedDict moved around) is walked
    in its own order: the compiled walk hands such a model to the Python loop."""
    a, b = (SlimmableLinear([4, 8], [4, 8], widths=(0.5, 1.0)) for _ in range(2))
    model = torch.nn.Sequential(a, b)
    model._modules = collections.OrderedDict(model._modules)
    model._modules.move_to_end("0")
    assert slimmable_layers(model) == [b, a]


def test_slimmable_layers_passes_errors_on(walk):
    """An exception from a layer's attributes reaches the caller from either walk."""

    class Broken(SlimmableLinear):
        @property
        def walk_submodules(self):
            raise RuntimeError("broken layer")

    model = torch.nn.Sequential(torch.nn.ReLU(), Broken([4, 8], [4, 8], widths=(0.5, 1.0)))
    with pytest.raises(RuntimeError, match="broken layer"):
        slimmable_layers(model)

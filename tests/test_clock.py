import time

from rsavq.clock import StageClock, current, format_clock, timed, using


def test_timed_is_a_no_op_without_a_clock():
    assert current() is None
    with timed("anything"):
        pass


def test_nested_stages_are_exclusive_and_add_up():
    clock = StageClock()
    with using(clock):
        with timed("outer"):
            time.sleep(0.05)
            for block in range(2):
                with timed("inner", block):
                    time.sleep(0.03)
        with timed("outer"):
            pass
    data = clock.to_dict()
    outer, inner = data["stages"]["outer"], data["stages"]["inner"]
    assert outer["calls"] == 2 and inner["calls"] == 2
    assert inner["seconds"] >= 0.055
    # the inner stage's time is not counted twice (that would make outer >= 0.05 + inner);
    # no upper bound of wall time: sleeps overrun on a loaded machine
    assert 0.045 <= outer["seconds"] < 0.045 + inner["seconds"]
    assert set(inner["per_item"]) == {"0", "1"} and "per_item" not in outer
    assert outer["seconds"] + inner["seconds"] <= data["total_seconds"]
    assert data["untimed_seconds"] >= 0
    assert outer["peak_rss_gib"] > 0 and data["peak_rss_gib"] >= inner["peak_rss_gib"]


def test_peak_rss_of_a_stage_sees_its_allocation():
    from helpers import fresh_resident_pages

    clock = StageClock()
    with using(clock):
        with timed("small"):
            pass
        with timed("big"):
            fresh_resident_pages(64 * 2**20).close()
    stages = clock.to_dict()["stages"]
    assert stages["big"]["peak_rss_gib"] - stages["small"]["peak_rss_gib"] > 0.04


def test_using_restores_the_outer_clock_and_format():
    outer, inner = StageClock(), StageClock()
    with using(outer):
        with using(inner), timed("a"):
            pass
        assert current() is outer
        with timed("b"):
            pass
    assert list(inner.to_dict()["stages"]) == ["a"] and list(outer.to_dict()["stages"]) == ["b"]
    text = format_clock(outer.to_dict())
    assert text.splitlines()[0].lstrip().startswith("b ") and "total" in text.splitlines()[-1]


def test_the_clock_names_its_cpu(tmp_path, monkeypatch):
    import rsavq.clock as clock_module

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n" * 2)
    real = clock_module.Path
    monkeypatch.setattr(clock_module, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert clock_module.cpu_name() == "AMD EPYC (family 25, model 17)"
    assert StageClock().to_dict()["cpu"] == "AMD EPYC (family 25, model 17)"
    info.unlink()  # no /proc/cpuinfo: the platform's name
    assert clock_module.cpu_name()

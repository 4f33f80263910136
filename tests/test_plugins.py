"""The entry-point registry (``crslight.plugins``), with ``entry_points`` patched, and the template plugin installed."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint, PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

import pytest

from crslight import plugins
from crslight.signals import SignalExtractor

ROOT = Path(__file__).resolve().parents[1]


class FakeDist:
    def __init__(self, name: str, version: str = "1.0"):
        self.name, self.version = name, version


class FakeEntryPoint:
    """An entry point as ``importlib.metadata`` gives it: name, value, group, the declaring distribution, load()."""

    def __init__(self, name: str, value: str, group: str, dist: FakeDist | None):
        self.name, self.value, self.group, self.dist = name, value, group, dist

    def load(self):
        return EntryPoint(self.name, self.value, self.group).load()


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Installs fake entry points: a good signal module on sys.path, a broken one, and a good metric.

    Yields the list of calls made to ``entry_points`` (to check that loading happens once).
    """
    (tmp_path / "fake_signal_plugin.py").write_text(textwrap.dedent("""
        from crslight.signals import SignalExtractor

        class LoudnessSignal(SignalExtractor):
            range = (0.0, 1.0)
            unit = "fraction"

            def __init__(self, threshold: int = 1):
                self.threshold = threshold

            def extract(self, batch):
                return [float(r.count("!") >= self.threshold) for r in batch.reply]
    """))
    (tmp_path / "broken_plugin.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = {
        "crslight.signals": [
            FakeEntryPoint("LoudnessSignal", "fake_signal_plugin:LoudnessSignal", "crslight.signals",
                           FakeDist("crslight-loudness", "0.3")),
            FakeEntryPoint("BrokenSignal", "broken_plugin:BrokenSignal", "crslight.signals",
                           FakeDist("crslight-broken", "9.9")),
        ],
        "crslight.metrics": [
            FakeEntryPoint("RecallAtK", "crslight.metrics.ranking:RecallAtK", "crslight.metrics",
                           FakeDist("crslight", "0.1.0")),
        ],
    }
    calls = []

    def entry_points(group):
        calls.append(group)
        return table.get(group, [])

    monkeypatch.setattr(plugins, "entry_points", entry_points)
    monkeypatch.setattr(plugins, "_registry", None)
    yield calls
    monkeypatch.setattr(plugins, "_registry", None)  # the next user reads the real entry points again


def test_loads_each_group_once(fake_plugins):
    first = plugins.load_plugins()
    assert plugins.load_plugins() is first
    groups = ["crslight.signals", "crslight.metrics", "crslight.simulators", "crslight.datasets"]
    assert fake_plugins == groups  # one pass, not two
    assert set(first) == set(groups)
    loudness = first["crslight.signals"]["LoudnessSignal"]
    assert (loudness.distribution, loudness.version) == ("crslight-loudness", "0.3")
    assert loudness.class_path == "fake_signal_plugin.LoudnessSignal"
    assert issubclass(plugins.get("signals", "LoudnessSignal"), SignalExtractor)
    assert plugins.get("crslight.metrics", "RecallAtK").__name__ == "RecallAtK"


def test_broken_plugin_is_reported_once_in_one_line(fake_plugins, caplog):
    with caplog.at_level(logging.WARNING, logger="crslight.plugins"):
        plugins.load_plugins()
        plugins.load_plugins()
        plugins.available("signals")
    records = [r for r in caplog.records if r.name == "crslight.plugins"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "\n" not in message
    assert "crslight-broken" in message and "ModuleNotFoundError" in message and "BrokenSignal" in message
    # everything else still works
    assert plugins.available("signals") == ["LoudnessSignal"]
    assert plugins.get("signals", "LoudnessSignal").__name__ == "LoudnessSignal"
    with pytest.raises(plugins.UnknownPluginError, match="crslight-broken 9.9 failed to import: ModuleNotFoundError"):
        plugins.get("signals", "BrokenSignal")


def test_unknown_name_lists_the_available_ones(fake_plugins):
    with pytest.raises(plugins.UnknownPluginError, match=r"no plugin 'Loudness' in crslight.signals; available: "
                                                         r"LoudnessSignal$"):
        plugins.get("signals", "Loudness")
    with pytest.raises(plugins.UnknownPluginError, match="available: none installed"):
        plugins.get("simulators", "Anything")
    with pytest.raises(ValueError, match="unknown plugin group"):
        plugins.get("callbacks", "X")


def test_listing_table_and_json(fake_plugins):
    rows = json.loads(plugins.plugins_listing(as_json=True))
    by_name = {r["name"]: r for r in rows}
    assert by_name["LoudnessSignal"] == {"group": "crslight.signals", "name": "LoudnessSignal",
                                         "class_path": "fake_signal_plugin.LoudnessSignal",
                                         "distribution": "crslight-loudness", "version": "0.3"}
    assert by_name["BrokenSignal"]["error"].startswith("ModuleNotFoundError")
    assert by_name["RecallAtK"]["distribution"] == "crslight"
    table = plugins.plugins_listing().splitlines()
    assert table[0].split() == ["group", "name", "distribution", "version", "class_path"]
    assert any(line.split()[:4] == ["crslight.signals", "LoudnessSignal", "crslight-loudness", "0.3"]
               for line in table)
    assert any("BrokenSignal" in line and "[failed: ModuleNotFoundError" in line for line in table)


def test_short_class_name_resolves_in_yaml_after_loading(fake_plugins):
    from jsonargparse import ArgumentParser

    plugins.load_plugins()  # imports fake_signal_plugin: nothing else in this process does
    parser = ArgumentParser()
    parser.add_argument("--signals", type=list[SignalExtractor])
    cfg = parser.parse_string("signals:\n  - class_path: LoudnessSignal\n    init_args:\n      threshold: 2\n")
    (signal,) = parser.instantiate(cfg).signals
    assert type(signal).__name__ == "LoudnessSignal" and signal.threshold == 2


def test_pyproject_declares_every_builtin_under_its_class_name():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, expected in [("crslight.signals", {"AcceptanceSignal", "DwellTimeSignal", "EngagementSignal",
                                                  "SemanticRelevanceSignal", "SentimentShiftSignal"}),
                            ("crslight.metrics", {"Coherence", "DistinctN", "ItemCoverage", "MRRAtK", "NDCGAtK",
                                                  "RecallAtK", "Satisfaction"})]:
        declared = project[group]
        assert set(declared) == expected
        for name, value in declared.items():
            assert EntryPoint(name, value, group).load().__name__ == name


def can_build_offline() -> bool:
    """True when this environment's setuptools can build the plugin's wheel without fetching build requirements."""
    try:
        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    # PEP 621 metadata needs setuptools 61; bdist_wheel moved into setuptools in 70.1 (before: the wheel package)
    return (major, minor) >= (70, 1) or ((major, minor) >= (61, 0) and find_spec("wheel") is not None)


def test_example_plugin_installs_and_is_listed(tmp_path):
    """pip-installs plugins/crslight-example (no deps) into a target folder and lists it in a fresh process.

    Offline and fast (no build isolation) where the environment's setuptools can build it; otherwise pip fetches the
    build backend into an isolated build environment from the configured index.
    """
    source = shutil.copytree(ROOT / "plugins" / "crslight-example", tmp_path / "src",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    offline = ["--no-build-isolation", "--no-index"] if can_build_offline() else []
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", *offline, "--quiet", "--disable-pip-version-check",
           "--target", str(target), str(source)]
    built = subprocess.run(pip, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "CRSLIGHT_CACHE": str(tmp_path / "cache")}
    script = textwrap.dedent("""
        import json
        from jsonargparse import ArgumentParser
        from crslight.plugins import load_plugins, plugins_listing
        from crslight.signals import SignalExtractor

        load_plugins()
        parser = ArgumentParser()
        parser.add_argument("--signals", type=list[SignalExtractor])
        cfg = parser.parse_string("signals:\\n  - class_path: QuestionRateSignal\\n")
        signal = parser.instantiate(cfg).signals[0]
        # the dataset loader, by its entry-point name
        from pathlib import Path
        from crslight.data import load_corpus
        root = Path("logs"); root.mkdir()
        (root / "items.csv").write_text("item_id,title\\nm1,Heat (1995)\\n")
        (root / "messages.csv").write_text("conversation_id,role,text,items\\n" + "".join(
            f"c{i},user,hi,\\nc{i},agent,Heat (1995)?,m1\\n" for i in range(30)))
        sizes = {s: len(load_corpus("chat_csv", root, s).dialogues) for s in ("train", "valid", "test")}
        print(json.dumps({"listing": json.loads(plugins_listing(as_json=True)), "parsed": type(signal).__name__,
                          "sizes": sizes}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=120, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    by_name = {r["name"]: r for r in result["listing"]}
    for name, group in [("QuestionRateSignal", "crslight.signals"), ("MeanReplyLength", "crslight.metrics"),
                        ("chat_csv", "crslight.datasets")]:
        assert by_name[name]["group"] == group
        assert (by_name[name]["distribution"], by_name[name]["version"]) == ("crslight-example", "0.1.0")
        assert "error" not in by_name[name]
    assert result["parsed"] == "QuestionRateSignal"
    assert sum(result["sizes"].values()) == 30 and min(result["sizes"].values()) > 0


def test_a_dataset_plugin_is_read_by_its_name_cached_and_checked(tmp_path, monkeypatch, capsys):
    """A loader registered in ``crslight.datasets`` is what ``load_corpus`` and ``crslight data`` read for its name;
    its conversion is cached until the files change; a loader that leaves out a split, or an unknown name, gets an
    error that says so (exit code 2 from the command)."""
    from types import SimpleNamespace

    from crslight import plugins
    from crslight.cli import main
    from crslight.data import DataError, load_corpus
    from crslight.schema import RECOMMENDER, SEEKER, turn

    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path / "cache"))
    calls = []

    def load_splits(root, report, skip_bad_rows):
        calls.append(root)
        text = (root / "log.txt").read_text()

        def dialogue(i):
            return {"dialogue_id": f"d{i}", "turns": [turn(SEEKER, text), turn(RECOMMENDER, "Heat?", ["m1"])],
                    "labels": [], "rating": float("nan"), "persona": ""}

        return ({"train": [dialogue(0), dialogue(1)], "valid": [dialogue(2)], "test": [dialogue(3)]},
                [{"item_id": "m1", "name": "Heat (1995)", "popularity": 0.0, "attributes": ""}])

    datasets = plugins.load_plugins()[plugins.GROUPS["datasets"]]
    for name, obj in [("toy", SimpleNamespace(load_splits=load_splits)),
                      ("half", SimpleNamespace(load_splits=lambda root, report, skip: ({"train": []}, [])))]:
        monkeypatch.setitem(datasets, name, plugins.Plugin("crslight.datasets", name, name, "test", "0", obj=obj))
    root = tmp_path / "logs"
    root.mkdir()
    (root / "log.txt").write_text("hello")
    train = load_corpus("toy", root, "train")
    assert len(train.dialogues) == 2 and train.dialogues[0]["turns"][0]["text"] == "hello"
    assert [s.item for s in train.rec_samples] == ["m1", "m1"]
    assert len(load_corpus("toy", root, "test").dialogues) == 1 and len(calls) == 1  # converted once
    (root / "log.txt").write_text("hello again")
    assert load_corpus("toy", root, "train").dialogues[0]["turns"][0]["text"] == "hello again" and len(calls) == 2
    assert main(["data", "stats", "--dataset", "toy", "--root", str(root), "--split", "valid"]) == 0
    assert '"dialogues": 1' in capsys.readouterr().out
    with pytest.raises(DataError, match="the half loader returned no valid, test split"):
        load_corpus("half", root, "train")
    with pytest.raises(ValueError, match="unknown dataset 'nope': expected one of .*redial.*toy"):
        load_corpus("nope", root)
    assert main(["data", "stats", "--dataset", "nope", "--root", str(root)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err

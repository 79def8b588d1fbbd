"""Datasets in a user's space: upload through the service, versions, fingerprints in runs and
MLflow, isolation, rename and delete. The uploaded data trains the tiny model for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import demo_form, submit_form
from sqlmodel import select

from portal.dataset_checks import DatasetSpec
from portal.datasets import DatasetRejected
from portal.demo import alpaca_rows
from portal.models import DatasetVersion


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_services(tmp_path_factory, mlflow_server, demo_assets):
    from conftest import install_assets

    from portal.config import Settings
    from portal.services import build_services

    settings = Settings(data_root=tmp_path_factory.mktemp("datasets"), mlflow_tracking_uri=mlflow_server, gpus=[],
                        dispatch_interval_seconds=0.5)
    install_assets(settings, demo_assets)
    services = build_services(settings)
    yield services, services.runs.ensure_user("dana"), services.runs.ensure_user("eve")
    services.runs.stop_supervisor()
    services.runs.stop_active_jobs(2)


def test_upload_makes_versions_stored_by_content(data_services, tmp_path):
    services, dana, _ = data_services
    first = write_jsonl(tmp_path / "support.jsonl", alpaca_rows(40))
    v1, _ = services.datasets.add(dana, first, "support_faq", DatasetSpec("alpaca"), source_name="support.jsonl")
    assert (v1.version, v1.rows, v1.file_type) == (1, 40, "jsonl")
    space = services.runs.space(dana)
    stored = space.datasets_dir / v1.file_name
    assert stored.read_bytes() == first.read_bytes() and v1.sha256[:32] in stored.name
    assert "support_faq" in services.catalog.dataset_names(space)
    info = json.loads((space.datasets_dir / "dataset_info.json").read_text())
    assert info["support_faq"]["file_name"] == v1.file_name and info["support_faq"]["portal_version"] == 1

    second = write_jsonl(tmp_path / "support2.jsonl", alpaca_rows(48))
    v2, _ = services.datasets.add(dana, second, "support_faq", DatasetSpec("alpaca"))
    assert v2.version == 2 and v2.sha256 != v1.sha256
    assert stored.is_file()  # version 1's file is untouched
    listing = {d.name: d for d in services.datasets.list(dana)}
    assert listing["support_faq"].version == 2 and listing["support_faq"].rows == 48
    assert listing["demo_alpaca"].shared and listing["demo_alpaca"].version is None
    assert [v.version for v in services.datasets.versions(dana, "support_faq")] == [2, 1]


def test_a_rejected_upload_leaves_nothing(data_services, tmp_path):
    services, dana, _ = data_services
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DatasetRejected) as info:
        services.datasets.add(dana, broken, "broken_set", DatasetSpec("alpaca"))
    assert "line 2, column 32" in str(info.value).lower() and info.value.report.problem("parse") is not None
    missing = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DatasetRejected) as info:
        services.datasets.add(dana, missing, "broken_set", DatasetSpec("alpaca"))
    assert "instruction" in str(info.value)
    space = services.runs.space(dana)
    assert "broken_set" not in services.catalog.dataset_names(space)
    assert not list((space.datasets_dir / "files").glob("*.part"))
    with services.db.session() as s:
        assert s.exec(select(DatasetVersion).where(DatasetVersion.name == "broken_set")).first() is None


def test_too_large_and_badly_named_uploads_are_refused(make_services, tmp_path):
    services = make_services(max_upload_mb=1, max_dataset_rows=100)
    user = services.runs.ensure_user("frank")
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"instruction": "x", "output": "y"}\n' * 40_000)  # ~1.4 MB
    with pytest.raises(DatasetRejected) as info:
        services.datasets.add(user, big, "big", DatasetSpec("alpaca"))
    assert "limited to 1 MB" in str(info.value) and "max_upload_mb" in str(info.value)
    many = write_jsonl(tmp_path / "many.jsonl", alpaca_rows(150))
    with pytest.raises(DatasetRejected) as info:
        services.datasets.add(user, many, "many", DatasetSpec("alpaca"))
    assert info.value.report.problem("too_many_rows") is not None
    ok = write_jsonl(tmp_path / "ok.jsonl", alpaca_rows(5))
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="dataset name"):
            services.datasets.add(user, ok, bad, DatasetSpec("alpaca"))


def test_uploaded_data_trains_and_the_run_keeps_its_version(data_services, tmp_path):
    """A run on an uploaded dataset records its fingerprint (row and MLflow); a later upload under
    the same name changes neither the run's record nor the data file it was pinned to."""
    services, dana, eve = data_services
    runs = services.runs
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    version, _ = services.datasets.add(dana, data, "my_train", DatasetSpec("alpaca"))
    model = services.settings.shared_models_root / "tiny-llama"
    # no held-out split here: the trainer's "Num examples" below is the whole pinned version
    run = submit_form(runs, dana, demo_form(model, "on_my_data", **{"train.dataset": ["my_train"], "train.val_size": 0}))
    fingerprints = json.loads(run.dataset_fingerprints)
    assert fingerprints[0]["name"] == "my_train" and fingerprints[0]["sha256"] == version.sha256
    assert fingerprints[0]["version"] == 1 and fingerprints[0]["rows"] == 48
    pinned = json.loads((Path(run.run_dir) / "datasets" / "dataset_info.json").read_text())
    assert pinned["my_train"]["file_name"] == str(runs.space(dana).datasets_dir / version.file_name)
    assert f"dataset_dir: {run.run_dir}/datasets" in run.config_yaml

    services.datasets.add(dana, write_jsonl(tmp_path / "v2.jsonl", alpaca_rows(60)), "my_train", DatasetSpec("alpaca"))
    run = runs.wait(dana, run.id, timeout=300, interval=0.5)
    assert run.status.value == "succeeded", runs.logs(dana, run.id)[-3000:]
    assert json.loads((Path(run.run_dir) / "datasets" / "dataset_info.json").read_text()) == pinned
    params = services.tracker.client.get_run(run.mlflow_run_id).data.params
    assert params["dataset.my_train.sha256"] == version.sha256 and params["dataset.my_train.version"] == "1"
    assert params["dataset.my_train.rows"] == "48"
    assert "Num examples = 48" in runs.logs(dana, run.id).replace(",", "")  # the trainer read version 1

    # the shared demo dataset (not uploaded) gets a fingerprint computed from its bytes
    prepared = runs.prepare(dana, {"stage": "sft", "do_train": True, "model_name_or_path": str(model),
                                   "template": "default", "finetuning_type": "lora", "dataset": "demo_alpaca",
                                   "output_dir": "x"}, for_submit=False)
    shared_print = prepared.fingerprints[0]
    assert shared_print["shared"] and len(shared_print["sha256"]) == 64 and shared_print["version"] is None

    # Eve cannot see or use Dana's dataset
    assert "my_train" not in [d.name for d in services.datasets.list(eve)]
    with pytest.raises(Exception) as info:
        runs.prepare(eve, {"stage": "sft", "do_train": True, "model_name_or_path": str(model), "template": "default",
                           "finetuning_type": "lora", "dataset": "my_train", "output_dir": "steal"}, for_submit=False)
    assert "unknown dataset 'my_train'" in str(info.value)
    with pytest.raises(ValueError, match="no dataset named 'my_train'"):
        services.datasets.delete(eve, "my_train")
    with pytest.raises(ValueError, match="no dataset named 'my_train'"):
        services.datasets.rename(eve, "my_train", "mine_now")

    # delete: the version a run used keeps its file, the unused one goes
    used_file = runs.space(dana).datasets_dir / version.file_name
    latest = services.datasets.versions(dana, "my_train")[0]
    removed = services.datasets.delete(dana, "my_train")
    assert removed == [latest.file_name] and used_file.is_file()
    assert "my_train" not in services.catalog.dataset_names(runs.space(dana))


def test_rename_moves_the_name_and_keeps_the_versions(data_services, tmp_path):
    services, dana, _ = data_services
    services.datasets.add(dana, write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10)), "old_name", DatasetSpec("alpaca"))
    services.datasets.rename(dana, "old_name", "new_name")
    names = services.catalog.dataset_names(services.runs.space(dana))
    assert "new_name" in names and "old_name" not in names
    assert [v.version for v in services.datasets.versions(dana, "new_name")] == [1]
    with pytest.raises(ValueError, match="shared dataset"):
        services.datasets.rename(dana, "demo_alpaca", "mine")
    with pytest.raises(ValueError, match="dataset name"):
        services.datasets.rename(dana, "new_name", "../../etc")


def test_sharegpt_upload_keeps_its_tags(data_services, tmp_path):
    services, dana, _ = data_services
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(12)]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    spec = DatasetSpec("sharegpt", columns={"messages": "messages"},
                       tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"})
    services.datasets.add(dana, path, "chat_set", spec)
    entry = json.loads((services.runs.space(dana).datasets_dir / "dataset_info.json").read_text())["chat_set"]
    assert entry["formatting"] == "sharegpt" and entry["tags"]["role_tag"] == "role"
    assert entry["columns"]["messages"] == "messages"

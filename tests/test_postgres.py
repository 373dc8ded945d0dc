"""MLflow on PostgreSQL, as a team runs it (``mlflow server --backend-store-uri postgresql+psycopg://…`` with proxied
artifacts, the ``team_tracking`` fixture): train.py through a crash of the database server and an outage of the
tracking server, then evaluate.py, compare.py and the registry against the same server. The Tune search killed and
resumed (test_tune) and the Serve application (test_serve_app) run against this server too."""
import csv
import io
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import REPO, Script, wait_for
from lade_core.tracking.store import find_run
from lade_core.train.checkpoint import latest_checkpoint

SERIES = ("val/top1", "val/ece", "train/loss", "lr")
EPOCHS = 10
compare, evaluate = Script("compare"), Script("evaluate")


def _env():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def test_a_run_survives_its_database_and_tracking_server_going_down(tmp_path, team_tracking, capsys):
    """After epoch 0 is logged, PostgreSQL crashes (immediate shutdown: the WAL is replayed on start), then the
    tracking server stops too, while the run trains on; both come back: the run finishes with each epoch's metrics
    exactly once, its test metrics and one model version. evaluate.py and compare.py then read and write the
    same server."""
    uri, client = team_tracking.uri, mlflow.MlflowClient(team_tracking.uri)
    cmd = [sys.executable, str(REPO / "pipelines" / "train.py"), "--smoke-test", "--num-cpus", "4", "--epochs",
           str(EPOCHS), "--mlflow-uri", uri, "--storage-path", str(tmp_path / "ray_results"), "--experiment",
           "team", "--run-name", "outage", "--register", "model-team"]
    # No client retries: a failed request fails at once, as it does once MLflow's retries run out, and lade's logger
    # keeps the epochs it could not write. The outages answer at once (a 500 while the database is down, a refused
    # connection while the server is), so the read timeout only has to outlast a slow answer from a live server:
    # at 5 s the run's first request timed out once in CI, the server sharing 2 cores with the run's Ray starting.
    env = {**_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run_dir = str(tmp_path / "ray_results" / "outage")
    db_down = server_down = False
    try:
        def epoch0_logged():
            time.sleep(0.5)  # a poll every half second, not a flood of requests beside the run's own
            exp = client.get_experiment_by_name("team")
            run = find_run(client, exp.experiment_id, "outage") if exp else None
            return run is not None and "val/top1" in client.get_run(run.info.run_id).data.metrics

        def trained_to(epoch):
            return lambda: (latest_checkpoint(run_dir) or (-1,))[0] >= epoch

        wait_for(epoch0_logged, 400, "epoch 0 in MLflow", proc)
        said_before = team_tracking.log.stat().st_size
        team_tracking.postgres.stop("immediate")  # the server answers 500: its database refuses connections
        db_down = True
        wait_for(trained_to(2), 400, "epochs trained with PostgreSQL down", proc)
        team_tracking.stop_server()  # now nothing answers at all
        server_down = True
        wait_for(trained_to(4), 400, "epochs trained with the tracking server down", proc)
        team_tracking.postgres.start()
        db_down = False
        team_tracking.start_server()
        server_down = False
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if db_down:
            team_tracking.postgres.start()
        if server_down:
            team_tracking.start_server()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "MLflow is unreachable" in out + err
    assert "connection refused" in team_tracking.log.read_text()[said_before:].lower()  # the run met the crash

    exp_id = client.get_experiment_by_name("team").experiment_id
    run = find_run(client, exp_id, "outage")
    rid = run.info.run_id
    for key in SERIES:
        assert [m.step for m in client.get_metric_history(rid, key)] == list(range(EPOCHS)), key
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["test/top1"] <= 1
    assert [str(v.version) for v in client.search_model_versions("name = 'model-team'")] == ["1"]
    client.set_registered_model_alias("model-team", "champion", "1")  # what a team does on review

    # evaluate.py through the registry's alias: the shifted protocol's metrics written to the run, once.
    assert evaluate.main(["--model", "models:/model-team@champion", "--mlflow-uri", uri, "--no-figures"]) == 0
    metrics = client.get_run(rid).data.metrics
    assert {"shift/backward_50/inject/top1", "shift/uniform/raw/ece"} <= set(metrics)
    assert len(client.get_metric_history(rid, "shift/forward_10/inject/top1")) == 1

    # compare.py over the experiment: its table names the run's loss, and the comparison is logged to the server.
    capsys.readouterr()
    assert compare.main(["--experiment", "team", "--mlflow-uri", uri, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out.strip())))
    assert rows and {r["loss"] for r in rows} == {"lade"}, rows
    inject = next(r for r in rows if r["posthoc"].split(" ")[0] == "inject")
    for target in ("uniform", "backward_50", "forward_10"):  # the same numbers as evaluate.py stored on the server
        assert float(inject[target]) == pytest.approx(metrics[f"shift/{target}/inject/top1"]), target
    logged = client.get_experiment_by_name("lade-compare")
    assert logged is not None and client.search_runs([logged.experiment_id])


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="as root the server runs as nobody; other users run it as themselves")
def test_the_server_starts_from_an_environment_in_a_private_home(tmp_path):
    """A checkout in /root/... (0700): its virtual environment's binaries are out of ``nobody``'s reach, yet the
    team server starts and answers (a real PostgreSQL, its binaries copied where ``nobody`` can read them)."""
    import shutil

    import psycopg
    from postgres import PostgresServer, wheel_install

    from conftest import free_port

    home = tmp_path / "home"  # pytest's tmp folders are 0700 to root, as root's home is
    home.mkdir(mode=0o700)
    site = home / "venv" / "site-packages"
    wheel = wheel_install()  # site-packages/pgserver/pginstall, its vendored libraries in site-packages/pgserver.libs
    for folder in (wheel.parent, wheel.parent.parent / "pgserver.libs"):
        shutil.copytree(folder, site / folder.name, symlinks=True)
    server = PostgresServer(free_port(), install=site / "pgserver" / "pginstall")
    try:
        assert not str(server.install).startswith(str(tmp_path))
        server.start()
        server.create_database("mlflow")
        with psycopg.connect(server.uri("mlflow", driver=False)) as conn:
            assert conn.execute("SELECT current_database(), current_user").fetchone() == ("mlflow", "lade")
    finally:
        server.close()


"""Rank and rendezvous detection for torchrun / deepspeed, SLURM steps and single processes."""
from __future__ import annotations

import pytest

from itpn_ds.distributed import PORT_BASE, PORT_SPAN, detect, first_node_address, port_for_job


def test_torchrun_and_deepspeed_variables_win():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400",
           "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    dist = detect(env)
    assert (dist.rank, dist.local_rank, dist.world_size, dist.launcher) == (3, 1, 8, "torchrun")
    assert (dist.master_addr, dist.master_port) == ("10.0.0.2", 29400)


def test_srun_task_takes_rank_from_slurm_and_port_from_job_id():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_STEP_NUM_TASKS": "6", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[01-03]",
           "MASTER_ADDR": "10.1.1.1"}
    dist = detect(env)
    assert (dist.rank, dist.local_rank, dist.world_size, dist.launcher) == (5, 1, 6, "slurm")
    assert (dist.master_addr, dist.master_port) == ("10.1.1.1", port_for_job(123456))
    assert not dist.is_main


def test_batch_script_outside_a_step_is_a_single_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "c[1-2]"}
    assert detect(env).world_size == 1 and detect(env).launcher == "single"


def test_job_ports_stay_below_the_ephemeral_range():
    ports = {port_for_job(job) for job in range(0, 50_000, 7)}
    assert min(ports) >= PORT_BASE and max(ports) < PORT_BASE + PORT_SPAN <= 32768


@pytest.mark.slurm
def test_master_is_the_node_address_scontrol_reports(slurm_cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    assert first_node_address("c[1-2]") == "127.0.0.1"
    with pytest.raises(RuntimeError, match="scontrol"):
        first_node_address("nosuchnode[1-2]x")


def test_single_processes_rendezvous_on_a_free_port_unless_one_is_given():
    """Two single-process commands on one machine must not collide on a fixed port (29500)."""
    import socket

    first = detect({})
    with socket.socket() as taken:  # the port the first one chose is busy now; the next picks another
        taken.bind(("127.0.0.1", first.master_port))
        assert detect({}).master_port != first.master_port
    assert detect({"MASTER_PORT": "29511"}).master_port == 29511

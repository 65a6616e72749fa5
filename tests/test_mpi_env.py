"""A child mpiexec gets the user's Open MPI settings (run as root, MCA
parameters) and MPICH control variables but none of the variables of this
process's own MPI job."""
from conftest import clean_mpi_env


def test_child_environment_keeps_open_mpi_settings(monkeypatch):
    keep = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy":
            ":oversubscribe", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    drop = {"OMPI_COMM_WORLD_RANK": "0", "PMI_RANK": "0", "PMIX_NAMESPACE": "x",
            "HYDRA_CONTROL_FD": "9", "MPI_LOCALRANKID": "0"}
    for k, v in {**keep, **drop}.items():
        monkeypatch.setenv(k, v)
    env = clean_mpi_env()
    for k, v in keep.items():
        assert env.get(k) == v, k
    for k in drop:
        assert k not in env, k
    assert env["OMP_NUM_THREADS"] == "1"

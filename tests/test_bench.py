"""The machine record of every benchmark result (reslab/bench.py)."""

from reslab import precision
from reslab.bench import cpu_identity, machine_info

# the start of /proc/cpuinfo on a 2-core host: two processor blocks, the second another model
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
"""


def test_cpu_identity_reads_the_first_processor():
    assert cpu_identity(CPUINFO) == {
        "cpu_model": "AMD EPYC",
        "cpu_vendor": "AuthenticAMD",
        "cpu_family": 26,
        "cpu_model_number": 2,
    }


def test_cpu_identity_leaves_missing_fields_none():
    assert cpu_identity("processor\t: 0\nmodel name\t: Some CPU\n") == {
        "cpu_model": "Some CPU",
        "cpu_vendor": None,
        "cpu_family": None,
        "cpu_model_number": None,
    }


def test_machine_info_carries_the_identity(monkeypatch):
    # a CPU no development machine is, so that reading the real file cannot pass by chance;
    # the first read of /proc/cpuinfo is cached, so the cache is emptied around the fake one
    fake = CPUINFO.replace("AMD EPYC\n", "Test CPU\n", 1).replace(": 26\n", ": 99\n", 1)
    monkeypatch.setattr("reslab.precision.Path.read_text", lambda self: fake)
    precision.cpuinfo_fields.cache_clear()
    try:
        info = machine_info()
    finally:
        precision.cpuinfo_fields.cache_clear()
    assert (info["cpu_model"], info["cpu_family"], info["cpu_model_number"]) == ("Test CPU", 99, 2)

"""Standard NBD clients no one here wrote, run as commands against a real netswapd:
nbdinfo, nbdcopy, qemu-img/qemu-io and fio's nbd engine."""

import hashlib
import json
import os
import subprocess

MiB = 1 << 20
GiB = 1 << 30


def run(*argv, timeout=300, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def sha256_file(path, length=None):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining is None or remaining > 0:
            chunk = f.read(MiB if remaining is None else min(MiB, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def test_nbdinfo_list_shows_static_and_per_node_exports(daemon):
    # A node that attached once is listed too.
    run("nbdinfo", "--size", daemon.uri("swap/node1"))
    listing = json.loads(run("nbdinfo", "--json", "--list", daemon.uri("")))
    names = {e["export-name"]: e for e in listing["exports"]}
    assert {"disk", "ram", "ro", "swap/node1"} <= set(names)
    assert names["disk"]["description"] == "a file export"
    assert names["disk"]["export-size"] == 64 * MiB
    assert names["ro"]["is_read_only"] is True


def test_nbdinfo_info_of_static_and_per_node_exports(daemon):
    info = json.loads(run("nbdinfo", "--json", daemon.uri("disk")))
    [export] = info["exports"]
    assert export["export-size"] == 64 * MiB
    assert export["can_flush"] and export["can_fua"] and export["can_trim"]
    assert export["can_zero"] and export["can_multi_conn"] and export["can_cache"]
    assert export["block_size_maximum"] == 32 * MiB
    assert info["protocol"] == "newstyle-fixed"
    swap = json.loads(run("nbdinfo", "--json", daemon.uri("swap/node-b")))["exports"][0]
    assert swap["export-size"] == 64 * MiB and not swap["is_read_only"]
    assert run("nbdinfo", "--size", daemon.unix_uri("ram")).strip() == str(64 * MiB)


def test_nbdinfo_unknown_export_fails(daemon):
    result = subprocess.run(["nbdinfo", daemon.uri("no-such-export")], capture_output=True, text=True)
    assert result.returncode != 0


def test_nbdcopy_1gib_in_and_out(tmp_path):
    from support.daemon import start_daemon

    # A 1 GiB export (the size), on a daemon of its own.
    exports = """
        [[exports]]
        name = "big"
        backend = "file"
        path = "big.img"
        size = "1GiB"
    """
    daemon = start_daemon(tmp_path, exports=exports)
    try:
        source = tmp_path / "source.img"
        with open(source, "wb") as f:
            for i in range(GiB // (16 * MiB)):
                # Mixed data and holes so nbdcopy's sparse handling is exercised too.
                f.write(os.urandom(16 * MiB) if i % 4 else bytes(16 * MiB))
        back = tmp_path / "back.img"
        run("nbdcopy", "--connections=4", "--requests=16", str(source), daemon.uri("big"))
        run("nbdcopy", "--connections=4", str(daemon.uri("big")), str(back))
        assert sha256_file(back) == sha256_file(source)
        assert sha256_file(daemon.state_dir / "big.img") == sha256_file(source)
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "Traceback" not in daemon.log()


def test_qemu_io_write_patterns_and_verify(daemon):
    uri = daemon.uri("disk")
    commands = []
    for i, (offset, length) in enumerate([(0, 4096), (65536, 131072), (1 * MiB + 512, 7 * 512), (60 * MiB, 4 * MiB)]):
        commands += ["-c", f"write -P 0x{0x11 * (i + 1):02x} {offset} {length}"]
    commands += ["-c", "flush", "-c", f"write -z {32 * MiB} {MiB}", "-c", f"discard {40 * MiB} {MiB}"]
    run("qemu-io", "-f", "raw", *commands, uri)
    verify = []
    for i, (offset, length) in enumerate([(0, 4096), (65536, 131072), (1 * MiB + 512, 7 * 512), (60 * MiB, 4 * MiB)]):
        verify += ["-c", f"read -P 0x{0x11 * (i + 1):02x} {offset} {length}"]
    verify += ["-c", f"read -P 0 {32 * MiB} {MiB}"]
    out = run("qemu-io", "-f", "raw", "-r", *verify, uri)
    assert "Pattern verification failed" not in out


def test_qemu_img_convert_and_compare(daemon, tmp_path):
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(8 * MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), daemon.uri("ram"))
    out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), daemon.uri("ram"))
    assert "Images are identical" in out or "identical" in out
    info = json.loads(run("qemu-img", "info", "--output=json", daemon.uri("ram")))
    assert info["virtual-size"] == 64 * MiB


def test_fio_verify_crc32c_iodepth_32_two_connections(daemon, tmp_path):
    job = tmp_path / "verify.fio"
    job.write_text(
        f"""
[global]
ioengine=nbd
uri={daemon.uri("disk")}
rw=randwrite
bs=4k
iodepth=32
size=16m
verify=crc32c
verify_fatal=1
do_verify=1

[conn1]
offset=0

[conn2]
offset=32m
"""
    )
    # fio leaves verify state files in its working directory: keep them in tmp_path.
    out = run("fio", "--output-format=json", str(job), timeout=600, cwd=tmp_path)
    result = json.loads(out[out.index("{"):])
    for job_result in result["jobs"]:
        assert job_result["error"] == 0
        assert job_result["write"]["io_bytes"] == 16 * MiB
        assert job_result["read"]["io_bytes"] == 16 * MiB  # the verify pass read it all back

"""bench/gpu_report.py: the GPU checks' RESULTS.md section from gpu_checks.sh's logs, one per device, replaced."""
from bench.gpu_report import main


def test_writes_one_section_per_device_and_replaces_it(tmp_path):
    logs, results = tmp_path / "out", tmp_path / "RESULTS.md"
    logs.mkdir()
    results.write_text("# Results\n\nkept text\n")
    (logs / "gpu.txt").write_text("NVIDIA H200, 580.159.04, 143771 MiB\ntorch 2.13.0 triton 3.7.1\n")
    (logs / "kernels_bf16.log").write_text("$ python3 -m bench.kernels --device cuda\nfirst figures\n")
    main([str(logs), "--results-md", str(results), "--seconds", "300"])
    text = results.read_text()
    assert "kept text" in text and "<!-- bench:gpu:nvidia-h200 -->" in text and "5.0 min in all" in text
    assert "(`python3 -m bench.kernels --device cuda`)" in text and "first figures" in text
    assert "**CUDA tests:** not run." in text
    (logs / "kernels_bf16.log").write_text("$ python3 -m bench.kernels --device cuda\nsecond figures\n")
    main([str(logs), "--results-md", str(results)])
    text = results.read_text()
    assert text.count("### GPU checks on NVIDIA H200") == 1 and "second figures" in text and "first figures" not in text

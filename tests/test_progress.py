"""A host's progress lines on a fake clock: "compiling" first, then decode rates and an ETA with compiling left out."""

import logging

from levanter_multihost import host_work
from levanter_multihost.host_work import Progress


def test_rates_and_eta_count_decoding_only_and_the_last_batch_always_reports(monkeypatch, caplog):
    clock = {"wall": 0.0, "compiled": 0.0}
    monkeypatch.setattr(host_work.time, "perf_counter", lambda: clock["wall"])
    caplog.set_level(logging.INFO, logger=host_work.logger.name)
    progress = Progress(3, 2, 400, 1.0, lambda: clock["compiled"])

    def at(wall: float, compiled: float) -> None:
        clock.update(wall=wall, compiled=compiled)

    progress.batch_started(0)
    at(30, 25)  # prefill, 25 s of it compiling
    progress.on_round(0)
    at(40, 30)  # 10 s later, 5 s of them compiling the decode step: 100 tokens in 5 s of decoding
    progress.on_round(100)
    progress.batch_done(200, decode_s=8.0)  # not the last batch, and within the interval: no line
    progress.batch_started(1)
    at(50, 30)
    progress.on_round(0)
    at(55, 30)
    progress.on_round(100)  # 300 tokens in 8 + 5 s
    at(56, 30)
    progress.batch_done(200, decode_s=6.0)
    assert caplog.messages == [
        "host 3: batch 1/2: compiling the engine's programs and prefilling; decode rates follow",
        "host 3: batch 1/2 decoding, 0/400 tokens (0%)",  # nothing timed yet: no rate
        "host 3: batch 1/2, 100/400 tokens (25%), 20.0 tok/s decoding, ETA 15s",
        "host 3: batch 2/2 decoding, 200/400 tokens (50%), 25.0 tok/s decoding, ETA 8s",  # the first batch's rate
        "host 3: batch 2/2, 300/400 tokens (75%), 23.1 tok/s decoding, ETA 4s",
        "host 3: batch 2/2 done, 400/400 tokens (100%), 28.6 tok/s decoding, ETA 0s",
    ]

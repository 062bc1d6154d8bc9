"""The rank-0 progress display of a training run (``logging.progress``)."""

from __future__ import annotations

__all__ = ["Progress"]


class Progress:
    """Rank-0 progress line: tqdm (or tqdm.rich), a plain log line every log_interval, or nothing."""

    def __init__(self, kind: str, total: int, initial: int, log_interval: int) -> None:
        self.kind, self.log_interval, self.bar = kind, log_interval, None
        if kind in ("tqdm", "rich"):
            if kind == "rich":
                from tqdm.rich import tqdm
            else:
                from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self, iteration: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.kind == "plain" and iteration % self.log_interval == 0:
            print(f"iter {iteration}: {text}", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.kind != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

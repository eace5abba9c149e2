"""Progress display: a tqdm bar on a terminal, plain log lines otherwise."""

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    """Steps done out of a total, with the latest figures shown beside them."""

    def __init__(
        self, total: int, initial: int = 0, desc: str = "", every: int = 10, enabled: bool = True
    ) -> None:
        self.enabled = enabled  # off on every rank but the first
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            if enabled and sys.stderr.isatty()
            else None
        )
        self.total, self.desc, self.every, self.count, self.done = total, desc, every, 0, initial

    def update(self, done: int, figures: dict[str, Any]) -> None:
        """Move to `done` steps and show `figures`."""
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items()}
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(text, refresh=False)
        else:
            self.count += 1
            if self.count % self.every == 0 or done == self.total:
                pairs = " ".join(f"{k}={v}" for k, v in text.items())
                print(f"{self.desc} {done}/{self.total} {pairs}", file=sys.stderr, flush=True)
        self.done = done

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()

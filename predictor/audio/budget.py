"""A request's decoding budget, in samples: frames x channels at each file's own rate.

What decoding costs is samples, not seconds: 300 s of 8-channel 384 kHz audio is a 300 s clip, and
costs as much to decode, downmix and resample as two hours of 16 kHz mono. So the budget counts
every sample of every channel at the rate it was recorded, over all the clips of a request. It is
checked against what the headers declare before anything is decoded (`check_declared`), and
charged with the frames decoding actually finds, since a header may not say, or may understate.
"""

from dataclasses import dataclass
from typing import Sequence

from ..errors import ClientInputError
from .source import Source


@dataclass
class SampleBudget:
    limit: int
    spent: int = 0

    def check_declared(self, sources: Sequence[Source]) -> None:
        declared = [source for source in sources if source.frames is not None]
        samples = sum(source.frames * source.channels for source in declared)
        if samples > self.limit:
            what = (_described(declared[0]) if len(declared) == 1
                    else f"frames x channels at each file's own rate, over {len(declared)} clips")
            raise ClientInputError(f"the request's audio holds {samples:,} samples ({what}): {samples - self.limit:,} "
                                   f"more than {self._limit}")

    def frames_left(self, channels: int) -> int:
        return max(0, self.limit - self.spent) // channels

    def charge(self, source: Source) -> None:
        self.spent += source.decoded * source.channels

    def refusal(self, source: Source) -> str:
        """What decoding says when this source runs past the budget."""
        return (f"the request's audio decodes to more than {self.limit:,} samples ({source.channels} channel(s) "
                f"at {source.rate} Hz in this clip, after {self.spent:,} samples before it): more than {self._limit}")

    @property
    def _limit(self) -> str:
        return f"this server decodes per request ({self.limit:,} samples, --max_request_samples)"


def _described(source: Source) -> str:
    return f"{source.frames / source.rate:.1f} s x {source.channels} channel(s) at {source.rate} Hz"

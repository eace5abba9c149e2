"""The synthetic worlds mmlm trains and tests on without downloads: shapes-world scenes, captions, charts and
instructions; spoken words (espeak-ng); short videos of moving shapes."""

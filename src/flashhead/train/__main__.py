"""`python -m flashhead.train stage1 CONFIG` (and `torchrun ... -m flashhead.train stage1 CONFIG`)."""

from flashhead.train.cli import train_app

if __name__ == "__main__":
    train_app()

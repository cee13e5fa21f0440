"""The item's path after the producer: worker models vote, the aggregator decides or
escalates, the judge decides the rest, the labels reader streams the outcomes; ``engine/``
is the one consumer loop they all run, ``backends/`` the models."""

DISTRIBUTION = "tribunal"  # checked by tribunal.foreign_packages: this is tribunal's ``consumers``

"""The fleet's consumers: worker models, the aggregator, the judge and the labels reader."""

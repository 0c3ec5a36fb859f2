"""A Flower app whose ServerApp runs fedbridge methods as strategies, one after the other."""

"""The networks, one file per family, plain nn.Modules that know nothing of the engine."""

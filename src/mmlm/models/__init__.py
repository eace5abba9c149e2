"""The nn.Modules of mmlm, each with its config beside it."""

"""The demos and studies: complete runs built on the library."""

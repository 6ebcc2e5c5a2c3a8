"""The kernel side: compiling and loading the C programs, attaching them, and their maps."""

"""The SimPy discrete-event simulator of amp4ec."""

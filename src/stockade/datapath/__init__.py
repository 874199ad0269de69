"""Datapaths: the kernel side, behind one small protocol (see `base`)."""

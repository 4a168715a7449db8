"""What a forked child closes: the parent's descriptors as listed just before the fork, and never
one the fork itself makes afterwards."""

import os

from runtime.children import open_files


def test_the_listing_s_own_descriptor_is_not_among_the_open_ones():
    before = open_files()
    read, write = os.pipe()  # the lowest free numbers: the listing's, had it been counted, among them
    try:
        assert read not in before and write not in before
        assert {read, write} <= open_files()
    finally:
        os.close(read)
        os.close(write)

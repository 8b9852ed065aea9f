"""Regions: a frame's cached maps (and pixels, for the detector and DASR*) enter; salient regions leave
(whole, R-MAC grid, EGM, SSD detector, DASR*) with pooled descriptors, a whitening fit and the region store.
"""

"""Flash attention in Mosaic GPU (Hopper): forward, backward, and the parts both passes share."""

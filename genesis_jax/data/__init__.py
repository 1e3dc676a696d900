"""From a corpus to device batches: host arrays, the device-resident corpus, masks, samplers, verse examples."""

"""Pure tensor math, geometry, configuration and I/O; imports nothing from model/, trainer/ or data_loader/."""

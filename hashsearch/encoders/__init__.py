"""Models, training and data sources: images in, codes and F7 features out."""

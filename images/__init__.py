"""Guest images: declarative recipes, a content-addressed store, and the builders that turn one into the other."""

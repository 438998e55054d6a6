public enum NetworkTestSupportPlaceholder {}
